"""Context statistics: which parts of an item carry a shortcut (the transplants that move them are in
`counterfactual.py`).

Nothing here assumes a cue's form. Context is read from non-contextual statistics gathered on the training labels
(`ContextStatistics`). What the default treats as a shortcut:

* a token is text context when it *points at one class* (its items' class distribution, pulled toward the prior by
  `support` pseudo-items, moves toward one class a large part of the way from the prior to certainty: its
  `token_determination`) **and** it is *blind to the rest of the item*: among the items of each class, those that
  hold it see the same image core as those that do not (`token_dependence`, read against each item's image-core
  reading: what its image says once its own image context is swapped out). A spurious cue is caused by the label
  (a hashtag added to sarcastic posts, a collection artefact), so given the label it says nothing about the image;
  a core word (a sentiment word, a sarcasm marker) takes part in what the item means, so given the label it moves
  with the image. Words that rule a class out without pointing at one (a sentiment word among three classes) are
  never context; words that point at one class but move with the image are core, however strong.
* where the image cannot tell (no image core that separates the classes: text-only data, one placeholder image, an
  image the base cannot read: `ContextStatistics.core_test_power`), no statistic of (word, label, rest)
  separates a word that expresses the label (`love`) from a collection's label-giving tag (`#Happy`). Strength
  alone does not decide then: a token is context only where it occurs in a *leak-prone form*
  (`leak_occurrences`: hashtags, mentions, URLs, emoji, placeholders such as `<num>`, whitespace artefacts; the
  forms collections leak and MMSD2.0's cleaning deleted); plain words are kept as core
  (`context_without_core_evidence`).
* image context is the image's mean colour plus the pixels whose linear discriminant of their neighbourhood
  (`local_descriptors`: the 3x3 pixels around it, each minus the mean of its 7x7 surround) is strong against the
  batch's strongest, grown to the marks they outline;
* the user's knowledge comes first: declared context (word patterns, image regions) is always context, protected
  words never are (`set_vocabulary`).

The same statistics give each item's bias evidence (`ContextStatistics.bias_evidence`), which routed experts read.
All functions are vectorised over rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_cfmoe import DECLARED_CONTEXT_PATTERNS, WithoutCoreEvidence

# The forms that collections leak labels through (the field's practice: MMSD2.0 deleted hashtags and emoji), matched
# like `DECLARED_CONTEXT_PATTERNS`: where the image cannot test a token, it can be context only inside a word of one
# of these forms.
LEAK_PRONE_FORMS = {
    **DECLARED_CONTEXT_PATTERNS,
    "placeholder": r"^<[A-Za-z_]+>$",  # an anonymisation placeholder: <num>, <user>, <url>
}  # and whitespace artefacts: a word marker alone (a double space, where a word was deleted), `leak_occurrences`
WORD_MARKERS = (" ", "\u2581", "\u0120")  # a piece starting with one of these starts a word
# a token moves with the image core, pixels or colour carry evidence, only when chance alone would rarely show as much
SIGNIFICANCE = 0.01
# the image core can test a token only where it tells the classes apart significantly and by at least this many
# within-class standard deviations (`ContextStatistics.core_separation`; the size of the dependence that makes a token
# core). Measured: 0.87 on the synthetic AND-sarcasm with the perception-pretrained tiny base (where the image alone
# decides a quarter of the items), 0.00-0.03 with one placeholder image for every item (rounding)
MIN_CORE_SEPARATION = 0.15
# covariances get a ridge of at least this share of the features' mean square: identical images (one placeholder for
# every item) differ only by rounding, which must not read as evidence
FLOOR = 1e-4
LEAK_SHARE = 0.5  # a token is of a leak-prone form when at least this share of its items hold it inside such a word
CORE_DIM = 64  # image-core features are projected to at most this many dimensions (per-token sums stay small)


@dataclass
class ContextStrength:
    """How strongly each part of a batch carries a shortcut alone (`spread` of its `ContextStatistics` scores).

    tokens: `(batch, length)` per token; pixels: `(batch, ..., height, width)` per pixel, or None (no image, or
    several per item).
    """

    tokens: torch.Tensor
    pixels: torch.Tensor | None


class ContextStatistics(nn.Module):
    """Running label statistics that score each token and image pixel by the shortcut it carries.

    Buffers (saved with the model):
    * `token_counts` `(vocab, num_labels)` int64, items of each class holding each token; `class_counts`
      `(num_labels,)` int64; `token_leak_counts` `(vocab,)` int64, items holding it inside a word of a leak-prone
      form (`LEAK_PRONE_FORMS`);
    * the image core (`update_core_readings`): the pooled features of context-swapped images, projected to
      `core_dim` dimensions by the fixed `core_projection` `(feature_dim, core_dim)`: `core_feature_sums`
      `(num_labels, core_dim)` and `core_feature_counts` `(num_labels,)` per class, `core_feature_products`
      `(core_dim, core_dim)` the sum of their outer products (a Gaussian linear discriminant of the image core),
      and per token `token_core_sums` `(vocab, num_labels, core_dim)` float32 and `token_core_counts`
      `(vocab, num_labels)` int64, the sum and number of those of the items of each class that hold it;
    * `local_sums` `(num_labels, local_dim)` float32, per class the sum of the items' mean local descriptor;
      `local_moments` `(local_dim + 1, local_dim + 1)` float32, the sums of `[d, 1] [d, 1]^T` over single pixels'
      descriptors (their count, mean and covariance), `local_item_moments` the same over the items' mean
      descriptors; `colour_sums` / `colour_moments` the same for the items' mean colour (the global component);
    * vocabulary flags (`set_vocabulary`): `continues_word` (the piece continues the word before it),
      `word_boundary` (specials and whitespace pieces: the piece after one starts a word), `declared_token` (always
      context), `protected_token` (never context), `leak_form`, `leak_sign` and `blank` (`leak_occurrences`),
      each `(vocab,)` bool.
    Closed-form, so they need no learning rate and follow any training recipe. `support`: the pseudo-items that
    pull a token's class distribution toward the prior (a token seen in few items points nowhere).
    """

    def __init__(
        self,
        vocab_size: int,
        local_dim: int,
        num_labels: int,
        num_channels: int = 3,
        support: float = 10.0,
        feature_dim: int = 1,
        covariance_pixels: int | None = None,
    ):
        super().__init__()
        core_dim = min(feature_dim, CORE_DIM)
        self.support, self.covariance_pixels = support, covariance_pixels
        self.radius = (math.isqrt(local_dim // num_channels) - 1) // 2  # local_dim = channels * (2 radius + 1)^2
        k = num_labels
        self.register_buffer("token_counts", torch.zeros(vocab_size, k, dtype=torch.long))
        self.register_buffer("class_counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("token_leak_counts", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("core_projection", core_projection(feature_dim, core_dim))
        self.register_buffer("core_feature_sums", torch.zeros(k, core_dim, dtype=torch.float32))
        self.register_buffer("core_feature_counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("core_feature_products", torch.zeros(core_dim, core_dim, dtype=torch.float32))
        self.register_buffer("token_core_sums", torch.zeros(vocab_size, k, core_dim, dtype=torch.float32))
        self.register_buffer("token_core_counts", torch.zeros(vocab_size, k, dtype=torch.long))
        self.register_buffer("local_sums", torch.zeros(k, local_dim, dtype=torch.float32))
        self.register_buffer("local_moments", torch.zeros(local_dim + 1, local_dim + 1, dtype=torch.float32))
        self.register_buffer("local_item_moments", torch.zeros(local_dim + 1, local_dim + 1, dtype=torch.float32))
        self.register_buffer("colour_sums", torch.zeros(k, num_channels, dtype=torch.float32))
        self.register_buffer("colour_moments", torch.zeros(num_channels + 1, num_channels + 1, dtype=torch.float32))
        for name in VOCABULARY_FLAGS:
            self.register_buffer(name, torch.zeros(vocab_size, dtype=torch.bool))

    def _apply(self, fn, recurse=True):
        """Casts (`model.half()`, `model.to(torch.bfloat16)`) leave the sums in float32: they grow past what half
        precision can count."""
        super()._apply(fn, recurse)
        for name in FLOAT_SUMS:
            self._buffers[name] = self._buffers[name].float()
        return self

    # ------------------------------------------------------------------------------------------ counting
    @torch.no_grad()
    def update(
        self, token_ids: torch.Tensor, token_mask: torch.Tensor, pixel_values: torch.Tensor | None, labels: torch.Tensor
    ) -> None:
        """Count a batch: token_ids / token_mask `(batch, length)` (each token counted once per item), pixel_values
        `(batch, ..., channels, height, width)` (one image per item) or None, labels `(batch,)`. Sums over every
        process under DDP."""
        onehot = nn.functional.one_hot(labels, self.class_counts.shape[0]).float()
        present = self._present(token_ids, token_mask)
        in_leak_word = self.leak_occurrences(token_ids, token_mask.bool())
        sums = {
            "token_counts": present.T @ onehot,
            "class_counts": onehot.sum(0),
            "token_leak_counts": self._present(token_ids, token_mask & in_leak_word).sum(0),
        }
        if pixel_values is not None:
            batch = labels.shape[0]
            centred = centred_pixels(pixel_values).flatten(0, -4)
            local = local_descriptors(centred[: self._covariance_images(centred)], self.radius)  # (images, dim, pixels)
            items = mean_descriptor(centred, self.radius)
            colour = mean_colour(pixel_values)
            items = items.view(batch, -1, items.shape[-1]).mean(1)
            sums["local_sums"] = onehot.T @ items
            sums["local_item_moments"] = _moments(items.T @ items, items.sum(0), batch)
            sums["local_moments"] = _moments(
                (local @ local.transpose(1, 2)).sum(0), local.sum((0, 2)), local[0, 0].numel() * local.shape[0]
            )
            sums["colour_sums"] = onehot.T @ colour
            sums["colour_moments"] = _moments(colour.T @ colour, colour.sum(0), batch)
        self._add(sums)

    def _covariance_images(self, images: torch.Tensor) -> int:
        """How many of `images` `(n, channels, height, width)` the descriptor covariance counts: the first whose
        pixels reach `covariance_pixels` (at least one), or all."""
        if self.covariance_pixels is None:
            return images.shape[0]
        return min(images.shape[0], max(1, math.ceil(self.covariance_pixels / images[0, 0].numel())))

    @torch.no_grad()
    def update_core_readings(
        self, token_ids: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
    ) -> None:
        """Count what some items' images show once their own context is swapped out: token_ids / token_mask
        `(n, length)` their texts, labels `(n,)`, features `(n, feature_dim)` their images' pooled features
        (projected by `core_projection`), per class and per token; they tell a token that moves with the image core
        (core) from one that is blind to it (a shortcut)."""
        onehot = nn.functional.one_hot(labels, self.class_counts.shape[0]).float()
        core = features.detach().float() @ self.core_projection
        per_class = (onehot.unsqueeze(-1) * core.unsqueeze(1)).flatten(1)  # (n, k * core_dim)
        present = self._present(token_ids, token_mask)
        self._add(
            {
                "core_feature_sums": onehot.T @ core,
                "core_feature_counts": onehot.sum(0),
                "core_feature_products": core.T @ core,
                "token_core_counts": present.T @ onehot,
                "token_core_sums": (present.T @ per_class).view(present.shape[1], *self.core_feature_sums.shape),
            }
        )

    def _core_gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The image core's class means `(num_labels, core_dim)` and pooled within-class covariance (with a ridge)."""
        counts = self.core_feature_counts.float().clamp_min(1)
        means = self.core_feature_sums / counts.unsqueeze(-1)
        within = (self.core_feature_products - (means.T * counts) @ means) / counts.sum()
        floor = FLOOR * self.core_feature_products.diagonal().mean() / counts.sum()
        ridge = 1e-2 * within.diagonal().mean().clamp_min(1e-6) + floor
        return means, within + ridge * torch.eye(within.shape[0], device=within.device)

    def core_discriminant(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The image core's linear discriminant (Fisher's): its weights `(core_dim, num_labels)` (the class scores of
        a projected feature `x` are `x @ weights`, each class's mean minus the overall mean, whitened by the pooled
        within-class covariance, so that the scores carry what tells the classes apart and nothing they share) and
        the within-class covariance of those scores `(num_labels, num_labels)`."""
        means, within = self._core_gaussian()
        counts = self.core_feature_counts.float()
        overall = (counts @ means) / counts.sum().clamp_min(1)
        weights = torch.linalg.solve(within, (means - overall).T)
        return weights, weights.T @ within @ weights

    def core_separation(self) -> torch.Tensor:
        """`(num_labels, num_labels)` Mahalanobis distances between the image core's class means: how far apart the
        images of two classes are once their context is swapped out (0: the image core tells them apart not at all,
        and no token can be found to move with it)."""
        means, within = self._core_gaussian()
        gaps = means.unsqueeze(0) - means.unsqueeze(1)  # (k, k, core_dim)
        return (gaps * torch.linalg.solve(within, gaps.flatten(0, 1).T).T.view_as(gaps)).sum(-1).clamp_min(0).sqrt()

    def core_p_value(self) -> torch.Tensor:
        """`()`: the p-value of the image core's class means differing as much as counted by chance alone
        (`_class_difference_p_value` of `update_core_readings`' features)."""
        moments = _moments(
            self.core_feature_products, self.core_feature_sums.sum(0), int(self.core_feature_counts.sum())
        )
        return self._class_difference_p_value(self.core_feature_sums, moments, self.core_feature_counts)

    def core_test_power(self) -> torch.Tensor:
        """`()` bool: whether the image core can tell a token that moves with it from one blind to it: its classes
        differ significantly (`core_p_value`) and by at least `MIN_CORE_SEPARATION` within-class standard
        deviations. Not with text-only data, one placeholder image for every item, or an image core the base cannot
        read. A tensor, so that asking costs no device synchronisation."""
        separated = self.core_separation().amax() >= MIN_CORE_SEPARATION
        return separated & (self.core_p_value() < SIGNIFICANCE)

    def _present(self, token_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """`(n, vocab)` float: 1 where the item holds the token (among `token_mask`)."""
        present = torch.zeros(token_ids.shape[0], self.token_counts.shape[0], device=token_ids.device)
        return present.scatter_add(1, token_ids * token_mask, token_mask.float()).clamp_max(1)

    def _add(self, sums: dict[str, torch.Tensor]) -> None:
        """Add `sums` to the buffers of the same names, summed over every process under DDP first."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for value in sums.values():
                torch.distributed.all_reduce(value)
        for name, value in sums.items():
            buffer = self._buffers[name]
            buffer += value.round().to(buffer.dtype) if not buffer.is_floating_point() else value

    # ------------------------------------------------------------------------------------------ text scores
    def class_prior(self) -> torch.Tensor:
        """`(num_labels,)` the share of each class among the counted items (uniform before any)."""
        classes = self.class_counts.float() + 1.0
        return classes / classes.sum()

    def token_scores(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`(..., num_labels)` each class's probability among the items holding the token, pulled toward the prior
        by `support` pseudo-items."""
        counts = self.token_counts[token_ids].float()
        prior = self.class_prior()
        return (counts + self.support * prior) / (counts.sum(-1, keepdim=True) + self.support)

    def token_determination(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`(...)` in [0, 1]: how far the token's items lean toward one class, `max_c (p_c - prior_c) / (1 - prior_c)`
        over its `token_scores`: 1 when every item holding it is of one class, 0 when they are distributed as all
        items are. A token that only rules a class out (its probability toward 0) points at no class."""
        prior = self.class_prior()
        return ((self.token_scores(token_ids) - prior) / (1 - prior).clamp_min(1e-6)).amax(-1).clamp_min(0)

    def token_dependence(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How much the items holding each token differ, within their class, in what their image core shows (the
        image-core discriminant's class scores of `update_core_readings`'s features), as (effect, p-value), each
        `(...)`.

        effect >= 0: the root mean square over classes (weighted by the token's items) and class scores of the
        shift of the token's mean score, in within-class standard deviations, less the shift that sampling alone
        gives (`1 / n` in squared units): about 0 for a token blind to the image given the label. p-value: of that
        shift under blindness (`sum_c n_c z_c^2` against a chi-square with one degree of freedom per class the token
        occurs in), so that a few items cannot make a token look dependent by chance. (0, 1) where the token has no
        image-core features, and everywhere when the core test has no power (`core_test_power`).
        """
        weights, score_covariance = self.core_discriminant()
        n = self.token_core_counts[token_ids].float()  # (..., k)
        means = self.core_feature_sums / self.core_feature_counts.float().clamp_min(1).unsqueeze(-1)
        shift = (self.token_core_sums[token_ids] / n.clamp_min(1).unsqueeze(-1) - means) @ weights  # (..., k, k)
        z2 = (shift.square() / score_covariance.diagonal().clamp_min(1e-12)).mean(-1)
        z2 = torch.where(n > 0, z2, torch.zeros_like(z2))
        corrected = torch.where(n > 0, z2 - 1 / n.clamp_min(1), torch.zeros_like(n))
        effect = ((n * corrected).sum(-1) / n.sum(-1).clamp_min(1)).clamp_min(0).sqrt()
        classes = (n > 0).sum(-1).float()
        statistic = (n * z2).sum(-1)
        p_value = torch.special.gammaincc(classes.clamp_min(1) / 2, statistic / 2)
        tested = (classes > 0) & self.core_test_power()
        return torch.where(tested, effect, 0.0), torch.where(tested, p_value, 1.0)

    def leak_share(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`(...)` in [0, 1]: the share of the token's items that hold it inside a word of a leak-prone form."""
        return self.token_leak_counts[token_ids] / self.token_counts[token_ids].sum(-1).clamp_min(1)

    def token_strength(
        self,
        token_ids: torch.Tensor,
        dependence_threshold: float | None,
        without_core_evidence: WithoutCoreEvidence = WithoutCoreEvidence.LEAK_FORMS,
        leak_occurrences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(...)` in [0, 1]: the shortcut each token carries: its `token_determination`, 0 when it moves with the
        image core (`token_dependence`: an effect of at least `dependence_threshold`, significant at
        `SIGNIFICANCE`; None: no such test) or is protected, 1 when it is declared context.

        Where the core test has no power (`core_test_power`), `without_core_evidence` decides: `LEAK_FORMS` keeps the
        strength only where a token is used in a leak-prone form (`leak_occurrences`, bool like `token_ids`: these
        occurrences, e.g. `ContextStatistics.leak_occurrences` of a batch; None: tokens used so in at least
        `LEAK_SHARE` of their items), so that a plain word is kept as core; `STRENGTH` keeps every token's."""
        strength = self.token_determination(token_ids)
        if dependence_threshold is not None:
            effect, p_value = self.token_dependence(token_ids)
            dependent = (effect >= dependence_threshold) & (p_value < SIGNIFICANCE)
            strength = torch.where(dependent, 0.0, strength)
            if without_core_evidence == WithoutCoreEvidence.LEAK_FORMS:
                if leak_occurrences is None:
                    leak_occurrences = self.leak_share(token_ids) >= LEAK_SHARE
                strength = torch.where(~self.core_test_power() & ~leak_occurrences, 0.0, strength)
        strength = torch.where(self.flag("protected_token", token_ids), 0.0, strength)
        return torch.where(self.flag("declared_token", token_ids), 1.0, strength)

    # ------------------------------------------------------------------------------------------ pixel scores
    def local_scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(..., height, width, num_labels)`: each pixel's linear discriminant score for each class (Fisher's, with
        the class means of the items' mean local descriptor and the covariance of single descriptors), centred on the
        overall mean. Computed as a convolution of the centred images: no descriptor is materialised.
        pixel_values: `(..., channels, height, width)`."""
        directions, offset = self._discriminant(self.local_sums, self.local_moments)
        images = centred_pixels(pixel_values).flatten(0, -4)
        size, radius = 2 * self.radius + 1, self.radius
        kernels = directions.T.reshape(directions.shape[1], images.shape[1], size, size)
        scores = nn.functional.conv2d(nn.functional.pad(images, (radius,) * 4, mode="replicate"), kernels)
        scores = (scores - offset.view(-1, 1, 1)).permute(0, 2, 3, 1)
        return scores.reshape(*pixel_values.shape[:-3], *scores.shape[1:])

    def colour_scores(self, colour: torch.Tensor) -> torch.Tensor:
        """`(..., num_labels)`: the linear discriminant score of each item's mean colour `(..., channels)`."""
        directions, offset = self._discriminant(self.colour_sums, self.colour_moments)
        return colour.float() @ directions - offset

    def local_p_value(self) -> torch.Tensor:
        """`()`: the p-value of the class means of the items' mean local descriptors differing as much as counted by
        chance alone (`_class_difference_p_value`): unless it is small, no pixel carries local evidence."""
        return self._class_difference_p_value(self.local_sums, self.local_item_moments)

    def colour_p_value(self) -> torch.Tensor:
        """`()`: the same for the items' mean colour: unless it is small, the colour is no context."""
        return self._class_difference_p_value(self.colour_sums, self.colour_moments)

    def _class_difference_p_value(
        self, sums: torch.Tensor, moments: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`()` p-value of the Lawley-Hotelling trace of per-item values: `(N - K) tr(W^-1 B)` (W, B the within- and
        between-class scatter of the items' values, from per-class sums `(num_labels, dim)` and the moments of single
        items `(dim + 1, dim + 1)`; `counts` the items per class, by default `class_counts`) against a chi-square with
        `dim (K - 1)` degrees of freedom. 1 before any item. In float64: W is the difference of two large scatters,
        which cancels in float32 on near-identical items; its ridge is at least `FLOOR` of the values' mean square."""
        counts = self.class_counts if counts is None else counts
        sums, moments, counts = sums.double(), moments.double(), counts.double()
        total = moments[-1, -1]
        overall = moments[-1, :-1] / total.clamp_min(1)
        gaps = sums / counts.clamp_min(1).unsqueeze(-1) - overall
        between = (gaps.T * counts) @ gaps
        within = moments[:-1, :-1] - total * torch.outer(overall, overall) - between
        classes, dim = sums.shape
        scale = (total - classes).clamp_min(1)
        ridge = 1e-6 * within.diagonal().mean().clamp_min(1e-12) + FLOOR * moments.diagonal()[:-1].mean()
        eye = torch.eye(dim, device=sums.device)
        statistic = scale * torch.linalg.solve(within + ridge * eye, between).diagonal().sum()
        dof = torch.tensor(dim * (classes - 1) / 2, device=sums.device)
        p_value = torch.special.gammaincc(dof, statistic.clamp_min(0) / 2)
        return torch.where(total > classes, p_value, torch.ones_like(p_value)).float()

    def _discriminant(self, sums: torch.Tensor, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fisher's directions `(dim, num_labels)` from per-class sums `(num_labels, dim)` and the moments of single
        values `(dim + 1, dim + 1)` (ridge-regularised covariance), and the score of the overall mean `(num_labels,)`
        (subtracted from every score)."""
        means = sums / self.class_counts.clamp_min(1).unsqueeze(-1)
        overall = sums.sum(0) / self.class_counts.sum().clamp_min(1)
        count = moments[-1, -1].clamp_min(1)
        mean = moments[-1, :-1] / count
        covariance = moments[:-1, :-1] / count - torch.outer(mean, mean)
        ridge = 1e-3 * covariance.diagonal().mean().clamp_min(1e-6)
        eye = torch.eye(covariance.shape[0], device=covariance.device)
        directions = torch.linalg.solve(covariance + ridge * eye, (means - overall).T)
        return directions, overall @ directions

    def bias_evidence(
        self, text_strength: torch.Tensor, local_strength: torch.Tensor | None, colour: torch.Tensor | None
    ) -> torch.Tensor:
        """`(batch, 3)`: how strongly each item's text, local pixels and overall colour carry a shortcut, as
        `log(1 + strength)` of its strongest parts, whichever class they point at.

        text_strength: `(batch,)` the largest `token_strength` of the item's tokens; local_strength: `(batch,)` the
        largest `spread` of its pixels' `local_scores`; colour: `(batch, channels)` the item's `mean_colour`. None:
        no image evidence (no image, or several per item).
        """
        local = colour_strength = torch.zeros_like(text_strength)
        if local_strength is not None:
            local, colour_strength = local_strength, spread(self.colour_scores(colour))
        return torch.stack([text_strength, local, colour_strength], dim=-1).float().clamp_min(0).log1p()

    # ------------------------------------------------------------------------------------------ vocabulary
    def set_vocabulary(
        self, tokenizer, declared_context: Sequence[str] = (), protected_words: Sequence[str] = ()
    ) -> None:
        """The vocabulary flags from a tokenizer.

        * `continues_word`: a piece whose text starts with no word marker (" ", "▁", "Ġ") and that is no special or
          byte token continues the word before it; `word_boundary`: special tokens and pieces that are whitespace
          (a newline byte, "Ċ"): the piece after one starts a word, so that text context is taken a whole word at a
          time;
        * `declared_token`: pieces matching one of `declared_context` (regular expressions, or the names of
          `DECLARED_CONTEXT_PATTERNS`) on their text without the word marker, or on the raw piece: a word holding one
          is always context;
        * `leak_form`: pieces of one of `LEAK_PRONE_FORMS`, matched in the same way; `leak_sign`: a lone `#` or
          `@` (the word after it is a hashtag or mention in pre-tokenized text); `blank`: a word marker alone;
        * `protected_token`: the pieces of `protected_words` (each word of each phrase, tokenized alone with and
          without a leading space, as written, lower-cased and capitalised): never context.
        """
        size = min(len(tokenizer), self.continues_word.shape[0])
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        texts = [tokenizer.convert_tokens_to_string([piece]) if piece is not None else "" for piece in pieces]
        patterns = [re.compile(DECLARED_CONTEXT_PATTERNS.get(name, name)) for name in declared_context]
        leak_forms = [re.compile(pattern) for pattern in LEAK_PRONE_FORMS.values()]
        flags = {name: torch.zeros(size, dtype=torch.bool) for name in VOCABULARY_FLAGS}
        for index, (piece, text) in enumerate(zip(pieces, texts, strict=True)):
            piece = piece or ""
            is_special = index in special
            flags["continues_word"][index] = not (is_special or piece.startswith((*WORD_MARKERS, "<")))
            flags["word_boundary"][index] = is_special or (text != "" and text.isspace())
            bare = text.strip()
            for name, forms in (("declared_token", patterns), ("leak_form", leak_forms)):
                flags[name][index] = not is_special and any(form.search(bare) or form.search(piece) for form in forms)
            flags["leak_sign"][index] = not is_special and bare in ("#", "@")
            flags["blank"][index] = not is_special and piece in WORD_MARKERS
        for word in {variant for phrase in protected_words for w in phrase.split() for variant in _variants(w)}:
            for ids in (tokenizer(word, add_special_tokens=False)["input_ids"],
                        tokenizer(" " + word, add_special_tokens=False)["input_ids"]):  # fmt: skip
                flags["protected_token"][[i for i in ids if i < size and i not in special]] = True
        for name, values in flags.items():
            self._buffers[name][:size] = values.to(self._buffers[name].device)

    def flag(self, name: str, token_ids: torch.Tensor) -> torch.Tensor:
        """The vocabulary flag `name` (`VOCABULARY_FLAGS`) of each token, bool (a checkpoint loaded with this module
        kept in float32 holds its flags as numbers)."""
        return self._buffers[name][token_ids].bool()

    def in_marked_words(self, token_ids: torch.Tensor, marks: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` bool: the `candidates` whose word (a piece that starts one and the pieces that continue
        it, among `candidates`) holds a piece of `marks` `(batch, length)`."""
        after_boundary = nn.functional.pad(self.flag("word_boundary", token_ids[:, :-1]), (1, 0), value=True)
        continues = self.flag("continues_word", token_ids) & ~after_boundary & candidates
        word = (~continues).long().cumsum(1)
        any_piece = torch.zeros(word.shape[0], word.shape[1] + 1, device=word.device)
        any_piece = any_piece.scatter_reduce(1, word, (marks & candidates).float(), "amax")
        return candidates & (any_piece.gather(1, word) > 0)

    def leak_occurrences(self, token_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` bool: the `candidates` inside a word of a leak-prone form (`leak_form`), inside the
        word right after a lone `#` or `@` (pre-tokenized releases such as MMSD write a hashtag `# funny`), or a word
        marker alone that no piece continues (a double space: where a collection deleted a word)."""
        after_sign = nn.functional.pad(self.flag("leak_sign", token_ids[:, :-1]), (1, 0), value=False)
        before_word = nn.functional.pad(~self.flag("continues_word", token_ids[:, 1:]), (0, 1), value=True)
        blank = self.flag("blank", token_ids) & before_word & candidates  # a word marker that is a word of its own
        return self.in_marked_words(token_ids, self.flag("leak_form", token_ids) | after_sign, candidates) | blank

    def whole_words(self, token_ids: torch.Tensor, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """`context` `(batch, length)` grown to whole words (`in_marked_words`): a word is context when any of its
        pieces is; protected pieces stay out."""
        return self.in_marked_words(token_ids, context, candidates) & ~self.flag("protected_token", token_ids)

    def resize_vocabulary(self, vocab_size: int) -> None:
        """Keep the statistics of the first `vocab_size` tokens; new tokens start unseen (and start words)."""
        kept = min(vocab_size, self.token_counts.shape[0])
        for name in ("token_counts", "token_leak_counts", "token_core_sums", "token_core_counts", *VOCABULARY_FLAGS):
            old = self._buffers[name]
            new = old.new_zeros(vocab_size, *old.shape[1:])
            new[:kept] = old[:kept]
            self._buffers[name] = new


VOCABULARY_FLAGS = (
    "continues_word", "word_boundary", "declared_token", "protected_token", "leak_form", "leak_sign", "blank",
)  # fmt: skip
FLOAT_SUMS = (
    "core_projection", "core_feature_sums", "core_feature_products", "token_core_sums", "local_sums", "local_moments",
    "local_item_moments", "colour_sums", "colour_moments",
)  # fmt: skip


def core_projection(feature_dim: int, core_dim: int) -> torch.Tensor:
    """`(feature_dim, core_dim)`: the identity when the features are small enough, else a fixed random orthonormal
    projection (seeded, so that every model gets the same one)."""
    if core_dim == feature_dim:
        return torch.eye(feature_dim)
    generator = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(feature_dim, core_dim, generator=generator))[0]


def _variants(word: str) -> set[str]:
    """A protected word as written, lower-cased and capitalised."""
    return {word, word.lower(), word.capitalize()}


def spread(scores: torch.Tensor) -> torch.Tensor:
    """How far scores `(..., num_labels)` spread over the classes, `max - min`: a strength blind to the class."""
    return scores.amax(-1) - scores.amin(-1)


def mean_colour(pixel_values: torch.Tensor) -> torch.Tensor:
    """Each item's mean colour `(batch, channels)` from pixel_values `(batch, ..., channels, height, width)`."""
    colour = pixel_values.float().mean((-2, -1))
    return colour.reshape(colour.shape[0], -1, colour.shape[-1]).mean(1)


def centred_pixels(pixel_values: torch.Tensor, surround: int = 3) -> torch.Tensor:
    """Each pixel minus the mean of its surround `(2 surround + 1)^2` pixels wide (reflect-padded; a box filter from
    running sums): local evidence only (a global tint or the image's overall colour is none of it).
    pixel_values `(..., channels, height, width)` -> the same shape, float32."""
    images = pixel_values.flatten(0, -4).float()
    box = window_sums(nn.functional.pad(images, (surround,) * 4, mode="reflect"), 2 * surround + 1)
    return (images - box / (2 * surround + 1) ** 2).view(pixel_values.shape)


def window_sums(padded: torch.Tensor, size: int) -> torch.Tensor:
    """The sum of every `size` x `size` window of `padded` `(..., height + size - 1, width + size - 1)`, from running
    sums along width, then height (a cost per pixel that does not grow with `size`): `(..., height, width)`."""
    box = padded
    for dim in (-1, -2):
        sums = nn.functional.pad(box.cumsum(dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
        box = sums.narrow(dim, size, sums.shape[dim] - size) - sums.narrow(dim, 0, sums.shape[dim] - size)
    return box


def local_descriptors(centred: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Each pixel's neighbourhood in `centred_pixels` `(images, channels, height, width)`, `(2 radius + 1)^2`
    pixels wide (replicate-padded): `(images, channels * (2 radius + 1)^2, pixels)`."""
    return nn.functional.unfold(nn.functional.pad(centred, (radius,) * 4, mode="replicate"), 2 * radius + 1)


def mean_descriptor(centred: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """The mean over all pixels of `local_descriptors(centred, radius)`, `(images, channels * (2 radius + 1)^2)`,
    from one shifted mean per offset (no descriptor materialised)."""
    padded = nn.functional.pad(centred, (radius,) * 4, mode="replicate")
    height, width, size = centred.shape[-2], centred.shape[-1], 2 * radius + 1
    shifted = [padded[..., y : y + height, x : x + width].mean((-2, -1)) for y in range(size) for x in range(size)]
    return torch.stack(shifted, -1).flatten(1)


def _moments(products: torch.Tensor, sums: torch.Tensor, count: int) -> torch.Tensor:
    """`[[sum d d^T, sum d], [sum d^T, count]]` `(dim + 1, dim + 1)` from its parts."""
    top = torch.cat([products, sums.unsqueeze(1)], 1)
    bottom = torch.cat([sums, sums.new_tensor([count])]).unsqueeze(0)
    return torch.cat([top, bottom], 0)
