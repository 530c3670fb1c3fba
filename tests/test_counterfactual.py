"""The fine-grained counterfactual rows: what a context swap and a core mask change, and what they keep."""

from __future__ import annotations

import torch

from modeling_cfmoe.counterfactual import CONTEXT_SWAPPED, CORE_MASKED, swap_context_tokens
from trainer.tiny import build_tiny_model

IMAGE_TOKENS, DIM = 4, 64


def test_swap_context_tokens_takes_the_partners_context_in_order():
    embeds = torch.arange(3 * 5, dtype=torch.float).view(3, 5, 1)  # token j of item i holds 5 i + j
    context = torch.tensor(
        [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [1, 0, 0, 1, 1]], dtype=torch.bool
    )  # 2, 1 and 3 context tokens
    rows, partner = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    swapped, missing = swap_context_tokens(embeds, context, rows, partner)
    # item 0's 1st context token takes item 1's only one; its 2nd has no counterpart and is dropped
    assert swapped[0, :, 0].tolist() == [0, 7, 2, 3, 4] and missing[0].tolist() == [0, 0, 0, 1, 0]
    # item 1's context token takes item 2's first; item 2's three take item 0's two, the third is dropped
    assert swapped[1, :, 0].tolist() == [5, 6, 10, 8, 9] and not missing[1].any()
    assert swapped[2, :, 0].tolist() == [1, 11, 12, 3, 14] and missing[2].tolist() == [0, 0, 0, 0, 1]


def _rows_inputs(model, batch: int = 3, text: int = 5):
    """input_ids `<image> x 4` + text tokens, random embeddings; the image features are the image positions,
    with the item of each."""
    image_id = model.mllm.config.image_token_id
    ids = torch.randint(10, 200, (batch, IMAGE_TOKENS + text))
    ids[:, :IMAGE_TOKENS] = image_id
    ids[:, -1] = 250  # the last text token of every item: the one the direct-effect table scores highest
    mask = torch.ones_like(ids, dtype=torch.bool)
    image_mask = ids == image_id
    embeds = torch.randn(batch, ids.shape[1], DIM)
    return ids, embeds, mask, image_mask, embeds[image_mask], image_mask.nonzero()[:, 0]


def test_context_swapped_rows_take_the_partners_context_and_keep_their_core():
    model, _ = build_tiny_model("sarcasm", seed=0, counterfactual_fraction=1.0)
    model.config.counterfactual_types = ["context_swapped", "core_masked"]
    model.token_direct_effect[250] = torch.tensor([2.0, -2.0])
    ids, embeds, mask, image_mask, features, image_rows = _rows_inputs(model)
    torch.manual_seed(0)
    cf_embeds, cf_mask, source, kind = model._counterfactual_rows(ids, embeds, mask, image_mask, features, image_rows)

    images = embeds[:, :IMAGE_TOKENS]
    means = images.mean(1, keepdim=True)
    for row in range(cf_embeds.shape[0]):
        item = int(source[row])
        partner = (item + 1) % ids.shape[0]
        cf_images = cf_embeds[row, :IMAGE_TOKENS]
        if kind[row] == CONTEXT_SWAPPED:
            # the partner's image-level component under the item's own patch deviations
            torch.testing.assert_close(cf_images.mean(0), means[partner, 0])
            torch.testing.assert_close(cf_images - cf_images.mean(0), images[item] - means[item])
            # the text context token (the last one) is the partner's; every other text token is the item's own
            torch.testing.assert_close(cf_embeds[row, -1], embeds[partner, -1])
            torch.testing.assert_close(cf_embeds[row, IMAGE_TOKENS:-1], embeds[item, IMAGE_TOKENS:-1])
            assert cf_mask[row].all()
        else:
            assert kind[row] == CORE_MASKED
            # every patch reduced to the image's mean; the text core dropped, the context token kept
            torch.testing.assert_close(cf_images, means[item].expand(IMAGE_TOKENS, -1))
            assert cf_mask[row, :IMAGE_TOKENS].all() and cf_mask[row, -1]
            assert not cf_mask[row, IMAGE_TOKENS + 1 : -1].any()  # the first text token always stays attended
    assert sorted(kind.tolist()) == [CONTEXT_SWAPPED] * 3 + [CORE_MASKED] * 3


def test_a_modality_left_out_of_the_counterfactuals_is_kept_whole():
    model, _ = build_tiny_model("sarcasm", seed=0, counterfactual_fraction=1.0)
    model.token_direct_effect[250] = torch.tensor([2.0, -2.0])
    ids, embeds, mask, image_mask, features, image_rows = _rows_inputs(model)
    for edited in ("text", "image"):
        model.config.counterfactual_modalities = [edited]
        cf_embeds, _, source, _ = model._counterfactual_rows(ids, embeds, mask, image_mask, features, image_rows)
        kept = slice(IMAGE_TOKENS, None) if edited == "image" else slice(0, IMAGE_TOKENS)
        changed = slice(0, IMAGE_TOKENS) if edited == "image" else slice(IMAGE_TOKENS, None)
        torch.testing.assert_close(cf_embeds[:, kept], embeds[source][:, kept])
        assert not torch.allclose(cf_embeds[:, changed], embeds[source][:, changed])


def test_patch_context_swaps_the_top_patches_with_the_partners_same_patches():
    model, _ = build_tiny_model("sarcasm", seed=0, counterfactual_fraction=1.0, image_context="patches")
    model.config.context_fraction = 0.25  # one of the four patches
    ids, embeds, mask, image_mask, features, image_rows = _rows_inputs(model)
    cf_embeds, cf_mask, source, _ = model._counterfactual_rows(ids, embeds, mask, image_mask, features, image_rows)
    for row, item in enumerate(source.tolist()):
        partner = (item + 1) % ids.shape[0]
        changed = ~torch.isclose(cf_embeds[row, :IMAGE_TOKENS], embeds[item, :IMAGE_TOKENS]).all(-1)
        assert int(changed.sum()) == 1
        torch.testing.assert_close(cf_embeds[row, :IMAGE_TOKENS][changed], embeds[partner, :IMAGE_TOKENS][changed])
