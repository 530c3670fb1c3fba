"""Context discovery and transplant: which parts of an item carry a modality's direct effect, and how a counterfactual
row takes another item's context while keeping its own core.

Nothing here assumes a cue's form. Context is read from non-contextual statistics of the direct effects, gathered on
the training labels (`ContextStatistics`): per vocabulary token, the log-odds of each class among the items that hold
it; per pixel, a linear discriminant of its neighbourhood (`local_descriptors`: the 3x3 pixels around it, each minus
the mean of its 7x7 surround) between the classes; per item, one of its mean colour. A token is context when alone it
moves the class log-odds a lot, a pixel when its discriminant is strong against the batch's strongest: a row without
such a token has no text context, a cue of several tokens is caught whole, a local mark or a frame is found where it
is, at pixel resolution; a global tint lives in the mean colour, which is always context. Transplants move the
partner's context in and the item's own context out, so a cue that is present in some items only is decorrelated too.
The same statistics give each item's bias evidence (`ContextStatistics.bias_evidence`), which the debiasing experts
are routed by. All functions are vectorised over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ContextStrength:
    """How strongly each part of a batch carries a shortcut alone (`spread` of its `ContextStatistics` scores).

    tokens: `(batch, length)` per token; pixels: `(batch, ..., height, width)` per pixel, or None (no image, or
    several per item).
    """

    tokens: torch.Tensor
    pixels: torch.Tensor | None


class ContextStatistics(nn.Module):
    """Running label statistics that score each token and image pixel by the direct effect it carries alone.

    Buffers (saved with the model): `token_counts` `(vocab, num_labels)` int64, items of each class holding each
    token; `class_counts` `(num_labels,)` int64; `local_sums` `(num_labels, local_dim)` float32, per class the sum of
    the items' mean local descriptor; `local_moments` `(local_dim + 1, local_dim + 1)` float32, the sums of
    `[d, 1] [d, 1]^T` over single pixels' descriptors (their count, mean and covariance); `colour_sums` /
    `colour_moments` the same for the items' mean colour (the global component); `continues_word`
    `(vocab,)` bool, the tokens that continue a word rather than start one (`set_word_pieces`), so that context is
    taken a whole word at a time. Closed-form, so they need no learning rate and follow any training recipe.
    """

    def __init__(self, vocab_size: int, local_dim: int, num_labels: int, num_channels: int = 3, smoothing: float = 1.0):
        super().__init__()
        self.smoothing = smoothing
        self.radius = (math.isqrt(local_dim // num_channels) - 1) // 2  # local_dim = channels * (2 radius + 1)^2
        self.register_buffer("token_counts", torch.zeros(vocab_size, num_labels, dtype=torch.long))
        self.register_buffer("continues_word", torch.zeros(vocab_size, dtype=torch.bool))
        self.register_buffer("class_counts", torch.zeros(num_labels, dtype=torch.long))
        self.register_buffer("local_sums", torch.zeros(num_labels, local_dim, dtype=torch.float32))
        self.register_buffer("local_moments", torch.zeros(local_dim + 1, local_dim + 1, dtype=torch.float32))
        self.register_buffer("colour_sums", torch.zeros(num_labels, num_channels, dtype=torch.float32))
        self.register_buffer("colour_moments", torch.zeros(num_channels + 1, num_channels + 1, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Casts (`model.half()`, `model.to(torch.bfloat16)`) leave the sums in float32: they grow past what half
        precision can count."""
        super()._apply(fn, recurse)
        for name in ("local_sums", "local_moments", "colour_sums", "colour_moments"):
            self._buffers[name] = self._buffers[name].float()
        return self

    @torch.no_grad()
    def update(
        self, token_ids: torch.Tensor, token_mask: torch.Tensor, pixel_values: torch.Tensor | None, labels: torch.Tensor
    ) -> None:
        """Count a batch: token_ids / token_mask `(batch, length)` (each token counted once per item), pixel_values
        `(batch, ..., channels, height, width)` (one image per item) or None, labels `(batch,)`. Sums over every
        process under DDP."""
        onehot = nn.functional.one_hot(labels, self.class_counts.shape[0]).float()
        present = torch.zeros(token_ids.shape[0], self.token_counts.shape[0], device=token_ids.device)
        present = present.scatter_add(1, token_ids * token_mask, token_mask.float()).clamp_max(1)
        sums = {"token_counts": present.T @ onehot, "class_counts": onehot.sum(0)}
        if pixel_values is not None:
            batch = labels.shape[0]
            centred = centred_pixels(pixel_values).flatten(0, -4)
            local = local_descriptors(centred, self.radius)  # (images, dim, pixels)
            items = mean_descriptor(centred, self.radius)
            colour = mean_colour(pixel_values)
            sums["local_sums"] = onehot.T @ items.view(batch, -1, items.shape[-1]).mean(1)
            sums["local_moments"] = _moments(
                (local @ local.transpose(1, 2)).sum(0), local.sum((0, 2)), local[0, 0].numel() * local.shape[0]
            )
            sums["colour_sums"] = onehot.T @ colour
            sums["colour_moments"] = _moments(colour.T @ colour, colour.sum(0), batch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for value in sums.values():
                torch.distributed.all_reduce(value)
        for name, value in sums.items():
            buffer = self._buffers[name]
            buffer += value.round().to(buffer.dtype) if not buffer.is_floating_point() else value

    def token_scores(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`(..., num_labels)` log-odds of each class given the token, against the class prior (smoothed)."""
        counts = self.token_counts[token_ids].float() + self.smoothing
        classes = self.class_counts.float() + self.smoothing
        prior = classes.log() - classes.sum().log()
        return counts.log() - counts.sum(-1, keepdim=True).log() - prior

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
        `log(1 + spread)` of its strongest scores, whichever class they point at.

        text_strength / local_strength: `(batch,)` the largest strength (`spread` of the scores) of the item's tokens
        and pixels; colour: `(batch, channels)` the item's `mean_colour`. None: no image evidence (no image, or
        several per item).
        """
        local = colour_strength = torch.zeros_like(text_strength)
        if local_strength is not None:
            local, colour_strength = local_strength, spread(self.colour_scores(colour))
        return torch.stack([text_strength, local, colour_strength], dim=-1).float().clamp_min(0).log1p()

    def set_word_pieces(self, tokenizer) -> None:
        """Mark the vocabulary's word-continuing pieces from a tokenizer: a token whose text starts with neither a
        space nor a word marker ("▁", "Ġ") continues the word before it. Special tokens always start one."""
        special = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), self.continues_word.shape[0]))))
        flags = [
            index not in special and not token.startswith((" ", "\u2581", "\u0120", "<"))
            for index, token in enumerate(tokens)
        ]
        self.continues_word[: len(flags)] = torch.tensor(flags, dtype=self.continues_word.dtype)

    def whole_words(self, token_ids: torch.Tensor, context: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """`context` `(batch, length)` grown to whole words: a word (a piece that starts one and the pieces that
        continue it, among `candidates`) is context when any of its pieces is."""
        continues = self.continues_word[token_ids].bool() & candidates
        word = (~continues).long().cumsum(1)
        any_piece = torch.zeros(word.shape[0], word.shape[1] + 1, device=word.device)
        any_piece = any_piece.scatter_reduce(1, word, context.float(), "amax")
        return candidates & (any_piece.gather(1, word) > 0)

    def resize_vocabulary(self, vocab_size: int) -> None:
        """Keep the counts of the first `vocab_size` tokens; new tokens start unseen (and start words)."""
        kept = min(vocab_size, self.token_counts.shape[0])
        counts = self.token_counts.new_zeros(vocab_size, self.token_counts.shape[1])
        counts[:kept] = self.token_counts[:kept]
        continues = self.continues_word.new_zeros(vocab_size)
        continues[:kept] = self.continues_word[:kept]
        self.token_counts, self.continues_word = counts, continues


def spread(scores: torch.Tensor) -> torch.Tensor:
    """How far scores `(..., num_labels)` spread over the classes, `max - min`: a strength blind to the class."""
    return scores.amax(-1) - scores.amin(-1)


def mean_colour(pixel_values: torch.Tensor) -> torch.Tensor:
    """Each item's mean colour `(batch, channels)` from pixel_values `(batch, ..., channels, height, width)`."""
    colour = pixel_values.float().mean((-2, -1))
    return colour.reshape(colour.shape[0], -1, colour.shape[-1]).mean(1)


def strong_context(strength: torch.Tensor, candidates: torch.Tensor, minimum: torch.Tensor | float) -> torch.Tensor:
    """Positions whose strength (`spread` of their scores) reaches `minimum` (and is more than 0).

    strength: `(...)` of each token or pixel; candidates: bool, broadcastable to it. Returns a bool mask `(...)`.
    """
    return candidates & (strength > 0) & (strength >= minimum)


def transplant_tokens(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    rows: torch.Tensor,
    partner: torch.Tensor,
    image_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each drawn row keeps its own tokens but its context, and takes its partner's context tokens at the places
    they held in the partner (so a cue's position says nothing of the row's own cue, and a row that had none is
    told from no other).

    embeds `(batch, length, dim)`; mask / context / image_mask `(batch, length)` bool; rows / partner `(n,)` item
    indices. Returns the rows' embeddings `(n, width, dim)`, attention mask and image-token mask `(n, width)`,
    compacted: the removed context leaves no gap.
    """
    length = embeds.shape[1]
    place = torch.arange(length, device=embeds.device, dtype=torch.float).expand(len(rows), -1)
    kept, given = mask[rows] & ~context[rows], context[partner]
    keys = torch.cat([place.masked_fill(~kept, float("inf")), (place - 0.5).masked_fill(~given, float("inf"))], 1)
    order = keys.argsort(dim=1, stable=True)
    width = int((kept.sum(1) + given.sum(1)).max())
    order = order[:, :width]
    pooled = torch.cat([embeds[rows], embeds[partner]], 1)
    row_embeds = pooled.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    row_mask = torch.cat([kept, given], 1).gather(1, order)
    row_images = torch.cat([image_mask[rows], torch.zeros_like(given)], 1).gather(1, order) & row_mask
    return row_embeds, row_mask, row_images


def centred_pixels(pixel_values: torch.Tensor, surround: int = 3) -> torch.Tensor:
    """Each pixel minus the mean of its surround `(2 surround + 1)^2` pixels wide (reflect-padded; a box filter from
    running sums): local evidence only (a global tint or the image's overall colour is none of it).
    pixel_values `(..., channels, height, width)` -> the same shape, float32."""
    images = pixel_values.flatten(0, -4).float()
    size = 2 * surround + 1
    box = nn.functional.pad(images, (surround,) * 4, mode="reflect")
    for dim in (-1, -2):  # the window sums along width, then height
        sums = nn.functional.pad(box.cumsum(dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
        box = sums.narrow(dim, size, sums.shape[dim] - size) - sums.narrow(dim, 0, sums.shape[dim] - size)
    return (images - box / size**2).view(pixel_values.shape)


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


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A bool mask `(..., height, width)` grown by `radius` pixels (the reach of a local descriptor)."""
    grid = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    grown = nn.functional.max_pool2d(grid, 2 * radius + 1, stride=1, padding=radius).squeeze(1).bool()
    return grown.view_as(mask)


def background_colour(pixel_values: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Mean colour `(..., channels, 1, 1)` of each image's pixels outside its local context (`(..., height, width)`
    bool), so that a local cue's own colour does not leak into the global component."""
    keep = (~context).unsqueeze(-3).to(pixel_values.dtype)
    return (pixel_values * keep).sum((-2, -1), keepdim=True) / keep.sum((-2, -1), keepdim=True).clamp_min(1)


def transplant_pixels(
    pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor
) -> torch.Tensor:
    """The rows' images with the partner's context: its background colour, and its pixels wherever the row's
    context lies (the row's own local cue leaves) or the partner's (the partner's arrives). A row without local
    context of its own leaves the footprint of another item's context instead, so that where pixels were replaced
    never tells whether the row had a cue.

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool;
    rows / partner `(n,)` item indices. Returns `(n, ..., channels, height, width)`.
    """
    own, given = pixel_values[rows], pixel_values[partner]
    colour = background_colour(pixel_values, context)
    recoloured = own - colour[rows] + colour[partner]
    has_context = context.flatten(1).any(1)
    footprint = context[rows]
    if bool(has_context.any()):
        donors = has_context.nonzero()[:, 0]
        decoy = context[donors[torch.randint(len(donors), (len(rows),), device=donors.device)]]
        footprint = torch.where(has_context[rows].view(-1, *[1] * (context.dim() - 1)), footprint, decoy)
    local = (footprint | context[partner]).unsqueeze(-3)
    return torch.where(local, given, recoloured)


def keep_only_context(pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows' images reduced to their context: the background colour and the context pixels, the rest flat.

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool.
    """
    own = pixel_values[rows]
    flat = background_colour(pixel_values, context)[rows].expand_as(own)
    return torch.where(context[rows].unsqueeze(-3), own, flat)
