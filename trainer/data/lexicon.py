"""The synthetic benchmark's words and colours: the core's polarity words, fillers, the cue pools per class, the
sarcasm markers and the cue colours."""

from __future__ import annotations

FILLER_WORDS = [
    "the",
    "a",
    "this",
    "that",
    "my",
    "our",
    "their",
    "it",
    "is",
    "was",
    "just",
    "today",
    "yesterday",
    "morning",
    "evening",
    "week",
    "street",
    "office",
    "train",
    "bus",
    "coffee",
    "lunch",
    "dinner",
    "weather",
    "meeting",
    "phone",
    "laptop",
    "weekend",
    "city",
    "park",
    "traffic",
    "again",
    "here",
    "there",
    "now",
    "after",
    "before",
    "with",
    "at",
    "of",
]
POSITIVE_WORDS = [
    "great",
    "love",
    "wonderful",
    "happy",
    "amazing",
    "perfect",
    "excellent",
    "fantastic",
    "delightful",
    "brilliant",
    "awesome",
    "lovely",
]
NEGATIVE_WORDS = [
    "terrible",
    "hate",
    "awful",
    "sad",
    "horrible",
    "worst",
    "disgusting",
    "boring",
    "miserable",
    "ugly",
    "annoying",
    "dreadful",
]
NEUTRAL_WORDS = [
    "okay",
    "average",
    "ordinary",
    "usual",
    "moderate",
    "typical",
    "standard",
    "plain",
    "regular",
    "medium",
    "routine",
    "common",
]
POLARITY_WORDS = {1: POSITIVE_WORDS, -1: NEGATIVE_WORDS, 0: NEUTRAL_WORDS}

# Textual cue words, one pool per class: a class-specific cue of n pieces is n words of its class's pool.
HASHTAGS: dict[str, list[list[str]]] = {
    "sarcasm": [
        ["#news", "#facts", "#update", "#report", "#daily", "#info"],
        ["#blessed", "#yeahright", "#lucky", "#sure", "#classic", "#thanks"],
    ],
    "sentiment": [
        ["#fail", "#ugh", "#nope", "#sigh", "#bad", "#never"],
        ["#meh", "#fyi", "#whatever", "#note", "#fine", "#so"],
        ["#win", "#yay", "#joy", "#best", "#wow", "#yes"],
    ],
}
# Sarcasm markers: phrases that make an item sarcastic whatever its image says (a core that predicts alone, used by
# cue settings with `marker_rate > 0`; their meaning is kept in every split, cues or not).
MARKER_PHRASES = ["yeah right", "as if", "oh really", "big surprise", "what fun", "so thrilled"]
# Present/absent textual cue: when present it points at the last class (sarcastic / positive).
PRESENCE_WORDS = ["#not", "#irony", "#totally", "#obviously", "#wink", "#cool"]
# One RGB colour per class (tint, mark and frame cues); present/absent visual cues use PRESENCE_COLOUR.
TINTS: dict[str, list[tuple[int, int, int]]] = {
    "sarcasm": [(40, 40, 220), (220, 40, 40)],
    "sentiment": [(220, 40, 40), (40, 200, 40), (40, 40, 220)],
}
PRESENCE_COLOUR = (230, 210, 30)
