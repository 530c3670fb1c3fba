"""Data: the real data sets' loaders as released (`real`), `load_benchmark` by name (`benchmarks`), the synthetic
planted-cue benchmark (`synthetic`, its words in `lexicon`) and the tiny offline default model (`tiny`)."""

from .benchmarks import BENCHMARKS, load_benchmark, parse_extra_test
from .real import (
    LoadReport,
    count_hashtags,
    count_text_cues,
    load_dmsd_ood,
    load_mmsd,
    load_mmsd_release,
    load_mvsa,
    load_mvsa_clmlf,
    mvsa_label,
    released_texts,
)
from .synthetic import LABEL_NAMES, SyntheticConfig, flip_cues, id2label, make_synthetic_benchmark

__all__ = [
    "BENCHMARKS",
    "LABEL_NAMES",
    "LoadReport",
    "SyntheticConfig",
    "count_hashtags",
    "count_text_cues",
    "flip_cues",
    "id2label",
    "load_benchmark",
    "load_dmsd_ood",
    "load_mmsd",
    "load_mmsd_release",
    "load_mvsa",
    "load_mvsa_clmlf",
    "make_synthetic_benchmark",
    "mvsa_label",
    "parse_extra_test",
    "released_texts",
]
