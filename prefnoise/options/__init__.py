"""One frozen options object per command, checked once at construction (see :mod:`prefnoise.options.ranges`)."""

from prefnoise.options.compare import ComparisonOptions
from prefnoise.options.corrupt import CorruptOptions
from prefnoise.options.engine import EngineOptions
from prefnoise.options.ranges import OPTION_RANGES, SEED_MAX, OptionError, Options, check_option, check_options, flag_of
from prefnoise.options.rank_check import RankCheckOptions
from prefnoise.options.reproduce import ReproduceAlignmentOptions, ReproduceSyntheticOptions
from prefnoise.options.score import ScoreOptions
from prefnoise.options.split import SplitOptions

__all__ = [
    "OPTION_RANGES",
    "SEED_MAX",
    "ComparisonOptions",
    "CorruptOptions",
    "EngineOptions",
    "OptionError",
    "Options",
    "RankCheckOptions",
    "ReproduceAlignmentOptions",
    "ReproduceSyntheticOptions",
    "ScoreOptions",
    "SplitOptions",
    "check_option",
    "check_options",
    "flag_of",
]
