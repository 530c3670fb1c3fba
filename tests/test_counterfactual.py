"""Context discovery and the counterfactual rows: what is found as context, what a transplant changes and keeps."""

from __future__ import annotations

import torch

from cfmoe.modeling_cfmoe.context import ContextStatistics, mean_colour, spread
from cfmoe.modeling_cfmoe.counterfactual import (
    CONTEXT_SWAPPED,
    CORE_MASKED,
    close_holes,
    dilate,
    keep_only_context,
    strong_context,
    transplant_pixels,
    transplant_tokens,
)
from cfmoe.modeling_cfmoe.counterfactual_rows import RowBatch
from cfmoe.trainer.data.tiny import build_tiny_model

CUE, OTHER = 7, 8  # token ids: a cue that only class 1 items hold, and a word of both classes


def _statistics_with_a_cue_token() -> ContextStatistics:
    statistics = ContextStatistics(vocab_size=12, local_dim=27, num_labels=2)
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0] * 4)
    ids = torch.full((32, 3), OTHER)
    ids[:, 1] = torch.where(labels == 1, CUE, 9)  # the cue in every class-1 item (twice in some: counted once)
    ids[::8, 2] = CUE
    statistics.update(ids, torch.ones_like(ids, dtype=torch.bool), None, labels)
    return statistics


def test_token_statistics_score_a_token_by_how_far_it_points_at_one_class():
    statistics = _statistics_with_a_cue_token()
    assert statistics.token_counts[CUE].tolist() == [0, 16] and statistics.token_counts[OTHER].tolist() == [16, 16]
    determination = statistics.token_determination(torch.tensor([CUE, OTHER, 3]))
    # 16 items, all of class 1, pulled toward the prior by 10 pseudo-items: (16 + 5) / 26 of class 1
    torch.testing.assert_close(determination[0], torch.tensor((21 / 26 - 0.5) / 0.5))
    assert determination[1].abs() < 1e-6 and determination[2].abs() < 1e-6  # both classes / never seen
    context = strong_context(determination, torch.ones(3, dtype=torch.bool), 0.6)
    assert context.tolist() == [True, False, False]
    assert statistics.token_determination(torch.arange(12)).argmax() == CUE  # the strongest token of the vocabulary
    rare = ContextStatistics(vocab_size=12, local_dim=27, num_labels=2)
    rare.update(torch.full((6, 1), CUE), torch.ones(6, 1, dtype=torch.bool), None, torch.ones(6, dtype=torch.long))
    assert rare.token_determination(torch.tensor(CUE)) < 0.5  # six items are no evidence of a shortcut


def test_a_word_that_rules_a_class_out_points_at_no_class():
    """Three classes: a sentiment word rules one class out (its items are positive or neutral), a cue points at one
    class: only the cue is strong (a rule on the spread of log-odds would flag both)."""
    labels = torch.tensor([2, 2, 1, 0, 0, 1] * 20)  # balanced
    ids = torch.full((120, 2), OTHER)
    ids[:, 0] = torch.where(labels > 0, 3, 4)  # token 3 in every positive or neutral item: class 0 ruled out
    ids[:, 1] = torch.where(labels == 2, CUE, OTHER)  # the cue in every positive item
    statistics = ContextStatistics(vocab_size=12, local_dim=27, num_labels=3)
    statistics.update(ids, torch.ones_like(ids, dtype=torch.bool), None, labels)
    ruling_out, pointing = statistics.token_determination(torch.tensor([3, CUE]))
    assert ruling_out < 0.3 < 0.7 < pointing
    log_odds = statistics.token_counts[3].float() + 1
    assert log_odds.max().log() - log_odds.min().log() > 3  # strong by the spread of log-odds nonetheless


def _core_statistics(dependent: bool) -> ContextStatistics:
    """Two classes; a cue token in most class-1 items, blind to the image; a core token (id 3) in half the items of
    each class, whose images differ from the others of their class along the image core when `dependent`."""
    torch.manual_seed(0)
    statistics = ContextStatistics(vocab_size=12, local_dim=27, num_labels=2, feature_dim=4)
    labels = torch.arange(400) % 2
    core = torch.rand(400) < 0.5
    ids = torch.full((400, 2), OTHER)
    ids[:, 0] = torch.where(core, 3, OTHER)
    ids[:, 1] = torch.where((labels == 1) & (torch.rand(400) < 0.9), CUE, OTHER)
    features = torch.randn(400, 4)
    features[:, 0] += 2.0 * labels  # the image core tells the classes apart along the first axis ...
    if dependent:
        features[:, 0] += torch.where(core, 1.0, -1.0)  # ... and moves with the core token within each class
    statistics.update(ids, torch.ones_like(ids, dtype=torch.bool), None, labels)
    statistics.update_core_readings(ids, torch.ones_like(ids, dtype=torch.bool), labels, features)
    return statistics


def test_a_strong_token_that_moves_with_the_image_core_is_core():
    for dependent in (False, True):
        statistics = _core_statistics(dependent)
        effect, p_value = statistics.token_dependence(torch.tensor([CUE, 3]))
        assert effect[0] < 0.1 and p_value[0] > 0.01  # the cue is blind to the image given the label
        if dependent:
            assert effect[1] > 0.5 and p_value[1] < 1e-6
        else:
            assert effect[1] < 0.1
    statistics = _core_statistics(dependent=True)
    statistics.token_counts[3] = torch.tensor([0, 200])  # make the core token point at class 1 as well
    strength = statistics.token_strength(torch.tensor([CUE, 3]), dependence_threshold=0.15)
    assert strength[0] > 0.7 and strength[1] == 0  # the cue stays a shortcut, the core token is released
    assert statistics.token_strength(torch.tensor([3]), dependence_threshold=None) > 0.7  # without the test: both
    assert statistics.core_separation()[0, 1] > 1.0  # the image core tells the classes apart


def test_context_is_taken_a_whole_word_at_a_time():
    model, processor = build_tiny_model("sarcasm", seed=0)
    statistics = model.rows.statistics
    tokenizer = processor.tokenizer
    statistics.set_vocabulary(tokenizer)
    # a word spelled in pieces right after a newline byte, as tokenizers without a word marker there give it
    pieces = ["\u2581great", "<0x0A>", "#", "to", "tally", "\u2581great"]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(pieces)])
    context = torch.zeros_like(ids, dtype=torch.bool)
    context[0, 4] = True  # only "tally" carries a direct effect of its own
    grown = statistics.whole_words(ids, context, torch.ones_like(context))
    # the newline ends a word: the word starts after it, and neither the newline nor the word before it joins
    assert [p for p, on in zip(pieces, grown[0].tolist(), strict=True) if on] == ["#", "to", "tally"]
    # the tiny tokenizer itself starts a word after a newline, as after a space
    encoded = tokenizer.convert_ids_to_tokens(tokenizer("\n#totally great")["input_ids"])
    assert "\u2581#totally" in encoded and "to" not in encoded, encoded


def test_declared_and_protected_words_override_the_statistics():
    model, processor = build_tiny_model("sarcasm", seed=0, declared_text_context=["hashtag"], protected_words=["great"])
    model.rows.set_vocabulary(processor.tokenizer)
    statistics, tokenizer = model.rows.statistics, processor.tokenizer
    ids = tokenizer(["lovely #news day great"], return_tensors="pt")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids[0])
    great, news = ids[0, pieces.index("\u2581great")], ids[0, pieces.index("\u2581#news")]
    statistics.token_counts[great] = torch.tensor([0, 500])  # as strong as a token can be, but protected
    strength = statistics.token_strength(ids, dependence_threshold=0.15)[0]
    assert strength[pieces.index("\u2581#news")] == 1.0 and strength[pieces.index("\u2581great")] == 0.0
    assert statistics.flag("declared_token", news) and statistics.flag("protected_token", great)
    candidates = torch.ones_like(ids, dtype=torch.bool)
    grown = statistics.whole_words(ids, torch.ones_like(ids, dtype=torch.bool), candidates)
    assert not grown[0, pieces.index("\u2581great")]  # protected pieces stay out of any word's context


def test_local_statistics_find_a_small_mark_and_ignore_a_global_tint():
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 3, 16, 16) * 0.1 + torch.randn(64, 3, 1, 1)  # noise + a random global colour per image
    images[:, 0, 2:5, 2:5] += torch.where(labels == 1, 2.0, -2.0).view(-1, 1, 1)  # the mark: red or anti-red
    images[:, 2] += torch.where(labels == 1, 1.0, -1.0).view(-1, 1, 1)  # a class tint: no local evidence
    statistics = ContextStatistics(vocab_size=4, local_dim=27, num_labels=2)
    statistics.update(torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1, dtype=torch.bool), images, labels)
    assert statistics.local_p_value() < 1e-6 and statistics.colour_p_value() < 1e-6  # both carry evidence
    strength = spread(statistics.local_scores(images))
    context = dilate(strong_context(strength, True, 0.5 * strength.max()), 2)
    mark = torch.zeros(16, 16, dtype=torch.bool)
    mark[2:5, 2:5] = True
    assert context[:, mark].float().mean() > 0.95  # the mark is caught whole
    near = dilate(mark, 3)  # the mark and the reach of its descriptors
    assert context[:, ~near].float().mean() < 0.02  # little else
    plain = ContextStatistics(vocab_size=4, local_dim=27, num_labels=2)
    tinted = torch.randn(64, 3, 16, 16) * 0.1 + torch.where(labels == 1, 1.0, -1.0).view(-1, 1, 1, 1)
    plain.update(torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1, dtype=torch.bool), tinted, labels)
    assert plain.local_p_value() > 0.01 and plain.colour_p_value() < 1e-6  # a tint alone: no pixel is local context


def test_a_covariance_budget_counts_the_first_images_and_still_finds_the_mark():
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 3, 16, 16) * 0.1
    images[:, 0, 2:5, 2:5] += torch.where(labels == 1, 2.0, -2.0).view(-1, 1, 1)
    tokens, mask = torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1, dtype=torch.bool)
    full, budget = (
        ContextStatistics(vocab_size=4, local_dim=27, num_labels=2, covariance_pixels=p) for p in (None, 600)
    )
    full.update(tokens, mask, images, labels)
    budget.update(tokens, mask, images, labels)
    assert full.local_moments[-1, -1] == 64 * 256 and budget.local_moments[-1, -1] == 3 * 256  # ceil(600 / 256) images
    for name in ("local_sums", "local_item_moments", "colour_sums"):  # every image still counts for the class means
        assert torch.equal(getattr(full, name), getattr(budget, name)), name
    found = []
    for statistics in (full, budget):
        strength = spread(statistics.local_scores(images))
        found.append(dilate(strong_context(strength, True, 0.5 * strength.max()), 2))
        assert found[-1][:, 2:5, 2:5].float().mean() > 0.95 and found[-1][:, 9:, 9:].float().mean() < 0.02
    assert (found[0] == found[1]).float().mean() > 0.98  # a covariance from 3 images finds what one from 64 does


def test_dilation_is_the_square_maximum():
    torch.manual_seed(0)
    for shape in [(6, 29, 31), (2, 3, 5, 4), (1, 1)]:
        mask = torch.rand(shape) > 0.9
        for radius in (1, 3):
            grid = mask.reshape(-1, 1, *shape[-2:]).float()
            square = torch.nn.functional.max_pool2d(grid, 2 * radius + 1, stride=1, padding=radius)
            assert torch.equal(dilate(mask, radius), square.bool().view(shape)), (shape, radius)


def test_closing_fills_a_solid_mark_found_at_its_rim():
    mark = torch.zeros(1, 16, 16, dtype=torch.bool)
    mark[0, 1:7, 1:7] = True  # a solid 6x6 mark near the corner
    found = mark.clone()
    found[0, 2:6, 2:6] = False  # its uniform interior shows no local evidence: only the rim is found
    closed = close_holes(found, 3)
    strip = torch.zeros_like(mark)
    strip[0, 0, :7] = strip[0, :7, 0] = True  # the gap between the mark and the border fills too
    assert closed[mark].all() and not closed[~(mark | strip)].any()  # the mark whole, nothing else


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


def test_a_partners_cue_of_several_words_arrives_whole_whatever_the_row_had():
    """A three-word cue at the start: a row without a cue of its own and a row whose cue was removed get the
    partner's cue as one block before their first own word (interleaved with the words of a row without a cue,
    it would show where the row's own cue was missing)."""
    embeds = torch.arange(3 * 6, dtype=torch.float).view(3, 6, 1)  # token j of item i holds 6 i + j
    mask = torch.ones(3, 6, dtype=torch.bool)
    context = torch.zeros(3, 6, dtype=torch.bool)
    context[0, 1:4] = context[2, 1:4] = True  # items 0 and 2 start (after token 0) with a three-word cue
    rows, partner = torch.tensor([1, 2]), torch.tensor([0, 0])
    swapped, swapped_mask, _ = transplant_tokens(embeds, mask, context, rows, partner, torch.zeros_like(mask))
    cue = [1.0, 2.0, 3.0]  # item 0's cue
    assert swapped[0, :, 0].tolist() == [6, *cue, 7, 8, 9, 10, 11]  # no cue of its own: the block before its words
    assert swapped[1, :6, 0].tolist() == [12, *cue, 16, 17] and swapped_mask[1].tolist() == [1] * 6 + [0] * 3


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
    # no image-core readings here: a plain cue token is context by its strength alone
    model, _ = build_tiny_model(
        "sarcasm", seed=0, counterfactual_fraction=1.0, context_without_core_evidence="strength"
    )
    image_id = model.mllm.config.image_token_id
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (1, 16 + 6)).repeat(4, 1)  # the same words in every item (no direct effect) ...
    ids[:, :16] = image_id
    ids[:2, -1] = 250  # ... but items 0 and 1 end with the cue token, items 2 and 3 with one of their other words
    ids[2:, -1] = ids[2:, -2]
    labels = torch.tensor([1, 1, 0, 0])
    images = torch.randn(4, 3, 32, 32) + torch.where(labels == 1, 0.5, -0.5).view(-1, 1, 1, 1)  # and a class tint
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": images}
    for _ in range(20):  # the cue token in class-1 items only
        model.rows.update(ids, labels, batch["attention_mask"], batch["pixel_values"])
    return model.train(), batch


def _counterfactual_rows(model, ids, embeds, mask, pixel_values):
    image_mask = ids == model.mllm.config.image_token_id
    strength = model.rows.strength(ids, pixel_values, warn=False)
    batch = RowBatch(ids, embeds, mask, image_mask, pixel_values, strength)
    return model.rows.build(batch, lambda edit, rows: model.model._insert_images(edit, {}))


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
    text = statistics.token_strength(ids, None).amax(1)
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
        "sarcasm",
        seed=0,
        counterfactual_fraction=1.0,
        num_visual_experts=4,
        num_text_experts=4,
        experts_top_k=2,
        context_without_core_evidence="strength",
    )
    routed.rows.statistics.load_state_dict(model.rows.statistics.state_dict())
    cf = _counterfactual_rows(routed.train(), ids, embeds, mask, batch["pixel_values"])
    assert cf.evidence.shape == (len(cf.source), 3)
    takes_cue = (cf.source + 1) % 4 < 2  # a context-swapped row takes its partner's text context (the cue token)
    assert (cf.evidence[takes_cue, 0] > cf.evidence[~takes_cue, 0].max()).all()
