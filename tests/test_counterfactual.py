"""Context discovery and the counterfactual rows: what is found as context, what a transplant changes and keeps."""

from __future__ import annotations

import torch

from modeling_cfmoe.context import (
    ContextStatistics,
    dilate,
    keep_only_context,
    mean_colour,
    spread,
    strong_context,
    transplant_pixels,
    transplant_tokens,
)
from modeling_cfmoe.counterfactual import CONTEXT_SWAPPED, CORE_MASKED
from trainer.tiny import build_tiny_model

CUE, OTHER = 7, 8  # token ids: a cue that only class 1 items hold, and a word of both classes


def _statistics_with_a_cue_token() -> ContextStatistics:
    statistics = ContextStatistics(vocab_size=12, local_dim=27, num_labels=2)
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0] * 4)
    ids = torch.full((32, 3), OTHER)
    ids[:, 1] = torch.where(labels == 1, CUE, 9)  # the cue in every class-1 item (twice in some: counted once)
    ids[::8, 2] = CUE
    statistics.update(ids, torch.ones_like(ids, dtype=torch.bool), None, labels)
    return statistics


def test_token_statistics_score_a_token_by_what_it_predicts_alone():
    statistics = _statistics_with_a_cue_token()
    assert statistics.token_counts[CUE].tolist() == [0, 16] and statistics.token_counts[OTHER].tolist() == [16, 16]
    scores = statistics.token_scores(torch.tensor([CUE, OTHER, 3]))
    strength = spread(scores)
    assert strength[0] > 2.5 and strength[1].abs() < 1e-6 and strength[2].abs() < 1e-6  # one class / both / never
    context = strong_context(strength, torch.ones(3, dtype=torch.bool), 2.0)
    assert context.tolist() == [True, False, False]
    everything = spread(statistics.token_scores(torch.arange(12)))
    assert everything.max() == strength[0]  # the cue is the strongest token of the vocabulary


def test_context_is_taken_a_whole_word_at_a_time():
    model, processor = build_tiny_model("sarcasm", seed=0)
    statistics = model.context_statistics
    statistics.set_word_pieces(processor.tokenizer)
    tokenizer = processor.tokenizer
    ids = tokenizer(["\n#totally great day"], return_tensors="pt")["input_ids"]  # after a newline: no space
    pieces = tokenizer.convert_ids_to_tokens(ids[0])
    start = pieces.index("#")
    assert pieces[start : start + 4] == ["#", "to", "tally", "\u2581great"], pieces  # the cue word falls apart
    context = torch.zeros_like(ids, dtype=torch.bool)
    context[0, start + 2] = True  # only "tally" carries a direct effect of its own
    candidates = torch.ones_like(context)
    grown = statistics.whole_words(ids, context, candidates)
    assert [p for p, on in zip(pieces, grown[0].tolist(), strict=True) if on] == ["<0x0A>", "#", "to", "tally"]


def test_local_statistics_find_a_small_mark_and_ignore_a_global_tint():
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 3, 16, 16) * 0.1 + torch.randn(64, 3, 1, 1)  # noise + a random global colour per image
    images[:, 0, 2:5, 2:5] += torch.where(labels == 1, 2.0, -2.0).view(-1, 1, 1)  # the mark: red or anti-red
    images[:, 2] += torch.where(labels == 1, 1.0, -1.0).view(-1, 1, 1)  # a class tint: no local evidence
    statistics = ContextStatistics(vocab_size=4, local_dim=27, num_labels=2)
    statistics.update(torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1, dtype=torch.bool), images, labels)
    strength = spread(statistics.local_scores(images))
    context = dilate(strong_context(strength, True, 0.5 * strength.max()), 2)
    mark = torch.zeros(16, 16, dtype=torch.bool)
    mark[2:5, 2:5] = True
    assert context[:, mark].float().mean() > 0.95  # the mark is caught whole
    near = dilate(mark, 3)  # the mark and the reach of its descriptors
    assert context[:, ~near].float().mean() < 0.02  # little else


def test_transplant_tokens_puts_the_partners_context_where_it_was_and_leaves_no_gap():
    embeds = torch.arange(3 * 5, dtype=torch.float).view(3, 5, 1)  # token j of item i holds 5 i + j
    mask = torch.ones(3, 5, dtype=torch.bool)
    images = torch.zeros(3, 5, dtype=torch.bool)
    images[:, 0] = True  # an image token first
    context = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    rows, partner = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    swapped, swapped_mask, swapped_images = transplant_tokens(embeds, mask, context, rows, partner, images)
    assert swapped.shape == (3, 7, 1)
    # item 0 loses its two context tokens and gets none: compacted, no gap
    assert swapped[0, :3, 0].tolist() == [0, 2, 4] and swapped_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    # item 1 keeps its five tokens; item 2's context arrives where it was in item 2 (before positions 2 and 4)
    assert swapped[1, :, 0].tolist() == [5, 6, 12, 7, 8, 14, 9] and swapped_mask[1].all()
    # item 2's context leaves, item 0's arrives at its places
    assert swapped[2, :5, 0].tolist() == [10, 1, 11, 3, 13] and swapped_mask[2].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert swapped_images.tolist() == [[1, 0, 0, 0, 0, 0, 0]] * 3  # the image tokens stay in place


def test_transplant_pixels_moves_the_colour_and_both_items_local_context():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 6, 6)
    context = torch.zeros(2, 6, 6, dtype=torch.bool)
    context[0, 0, 0] = context[1, 5, 5] = True  # each item's own local cue
    rows, partner = torch.tensor([0]), torch.tensor([1])
    swapped = transplant_pixels(images, context, rows, partner)[0]
    local = context[0] | context[1]
    torch.testing.assert_close(swapped[:, local], images[1][:, local])  # the item's cue leaves, the partner's arrives

    def background(image, cue):  # the mean colour without the image's own local cue
        return image[:, ~cue].mean(-1).view(3, 1, 1)

    recoloured = images[0] - background(images[0], context[0]) + background(images[1], context[1])
    torch.testing.assert_close(swapped[:, ~local], recoloured[:, ~local])  # the rest: own pattern, partner's colour
    kept = keep_only_context(images, context, rows)[0]
    torch.testing.assert_close(kept[:, 0, 0], images[0][:, 0, 0])
    torch.testing.assert_close(kept[:, 3, 3], background(images[0], context[0]).view(3))
    # a row without local context of its own leaves another item's footprint: where pixels were replaced says
    # nothing of whether it had a cue
    three = torch.cat([images, torch.randn(1, 3, 6, 6)])
    context = torch.cat([context, torch.zeros(1, 6, 6, dtype=torch.bool)])
    swapped = transplant_pixels(three, context, torch.tensor([2]), torch.tensor([1]))[0]
    replaced = (swapped == three[1]).all(0)
    assert replaced[5, 5] and int(replaced.sum()) == 1 + int(replaced[0, 0])  # the partner's cue + a decoy


def _model_and_batch():
    model, _ = build_tiny_model("sarcasm", seed=0, counterfactual_fraction=1.0)
    image_id = model.mllm.config.image_token_id
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (1, 16 + 6)).repeat(4, 1)  # the same words in every item (no direct effect) ...
    ids[:, :16] = image_id
    ids[:2, -1] = 250  # ... but items 0 and 1 end with the cue token, items 2 and 3 with one of their other words
    ids[2:, -1] = ids[2:, -2]
    labels = torch.tensor([1, 1, 0, 0])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(4, 3, 32, 32)}
    for _ in range(10):  # the cue token in class-1 items only
        model.update_context_statistics(ids, labels, batch["attention_mask"], batch["pixel_values"])
    return model.train(), batch


def _counterfactual_rows(model, ids, embeds, mask, pixel_values):
    image_mask = ids == model.mllm.config.image_token_id
    strength = model._context_strength(ids, pixel_values, ids.shape[0], warn=False)
    return model._counterfactual_rows(ids, embeds, mask, image_mask, pixel_values, {}, strength)


def test_context_swapped_rows_exchange_the_cue_token_and_keep_the_core():
    model, batch = _model_and_batch()
    model.config.counterfactual_types = ["context_swapped", "core_masked"]
    model.config.counterfactual_modalities = ["text"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    torch.manual_seed(0)
    cf = _counterfactual_rows(model, ids, embeds, mask, batch["pixel_values"])
    cf_embeds, cf_mask, source, kind = cf.embeds, cf.mask, cf.source, cf.kind
    cue, width = model.get_input_embeddings()(torch.tensor(250)), ids.shape[1]
    for row, item in enumerate(source.tolist()):
        partner = (item + 1) % 4
        tail = range(width - 1, cf_embeds.shape[1])  # the cue's slot, and a column appended for a partner's cue
        has_cue = any(bool(cf_mask[row, j]) and torch.equal(cf_embeds[row, j], cue) for j in tail)
        if kind[row] == CONTEXT_SWAPPED:
            assert has_cue == (partner < 2)  # the cue follows the partner, not the item
            torch.testing.assert_close(cf_embeds[row, : width - 1], embeds[item, :-1])  # the core is the item's own
        else:
            assert kind[row] == CORE_MASKED
            assert has_cue == (item < 2) and cf_mask[row, :16].all()  # the cue and the image tokens stay
            assert not cf_mask[row, 16 : width - 1].any()  # the rest of the text (the core) is masked out
    assert sorted(kind.tolist()) == [CONTEXT_SWAPPED] * 4 + [CORE_MASKED] * 4


def test_a_modality_left_out_of_the_counterfactuals_is_kept_whole():
    model, batch = _model_and_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    image_mask = ids == model.mllm.config.image_token_id
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        for edited in ("text", "image"):
            model.config.counterfactual_modalities = [edited]
            cf = _counterfactual_rows(model, ids, embeds, mask, batch["pixel_values"])
            cf_embeds, cf_mask, source = cf.embeds, cf.mask, cf.source
            images = image_mask[source]
            if edited == "image":  # same text, same width; the images went through the tower edited
                assert cf_embeds.shape == embeds.shape and torch.equal(cf_mask, mask[source])
                assert torch.equal(cf_embeds[~images], embeds[source][~images])
                assert not torch.equal(cf_embeds[images], embeds[source][images])
            else:  # the images untouched; the cue token moved (masked out in one row, appended in another)
                width = embeds.shape[1]
                assert torch.equal(cf_embeds[:, :width][images], embeds[source][images])
                assert cf_embeds.shape[1] > width or not torch.equal(cf_mask, mask[source])


def test_bias_evidence_tells_which_modality_carries_a_shortcut_not_which_class():
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    ids = torch.full((64, 2), OTHER)
    ids[:32, 1] = torch.where(labels[:32] == 1, CUE, 9)  # items 0-31: a text cue, one token per class
    images = torch.randn(64, 3, 16, 16) * 0.1
    images[32:, 0, 2:5, 2:5] += torch.where(labels[32:] == 1, 2.0, -2.0).view(-1, 1, 1)  # items 32-63: a mark
    statistics = ContextStatistics(vocab_size=12, local_dim=27, num_labels=2)
    statistics.update(ids, torch.ones_like(ids, dtype=torch.bool), images, labels)
    text = spread(statistics.token_scores(ids)).amax(1)
    pixels = spread(statistics.local_scores(images)).flatten(1).amax(1)
    evidence = statistics.bias_evidence(text, pixels, mean_colour(images))
    text_items, image_items = evidence[:32], evidence[32:]
    assert text_items[:, 0].min() > 2 * image_items[:, 0].max()  # the text cue shows in the text evidence ...
    assert image_items[:, 1].min() > 2 * text_items[:, 1].max()  # ... the mark in the local pixel evidence
    for items in (text_items, image_items):  # whichever class the cue points at, the same evidence
        by_class = [items[labels[:32] == c].mean(0) for c in (0, 1)]
        torch.testing.assert_close(by_class[0], by_class[1], rtol=0.1, atol=0.05)


def test_counterfactual_rows_carry_bias_evidence_only_where_a_router_reads_it():
    model, batch = _model_and_batch()  # one expert per site: nothing reads evidence
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    embeds = model.get_input_embeddings()(ids)
    assert _counterfactual_rows(model, ids, embeds, mask, batch["pixel_values"]).evidence is None
    routed, _ = build_tiny_model(
        "sarcasm", seed=0, counterfactual_fraction=1.0, num_visual_experts=4, num_text_experts=4, experts_top_k=2
    )
    routed.context_statistics.load_state_dict(model.context_statistics.state_dict())
    cf = _counterfactual_rows(routed.train(), ids, embeds, mask, batch["pixel_values"])
    assert cf.evidence.shape == (len(cf.source), 3)
    takes_cue = (cf.source + 1) % 4 < 2  # a context-swapped row takes its partner's text context (the cue token)
    assert (cf.evidence[takes_cue, 0] > cf.evidence[~takes_cue, 0].max()).all()
