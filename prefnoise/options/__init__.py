"""One frozen options object per command, checked once at construction (see :mod:`prefnoise.options.ranges`)."""

from prefnoise.options.ranges import OPTION_RANGES, SEED_MAX, OptionError, Options, check_option, check_options, flag_of

__all__ = ["OPTION_RANGES", "SEED_MAX", "OptionError", "Options", "check_option", "check_options", "flag_of"]
