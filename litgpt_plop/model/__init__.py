"""Putting a placement on a model and moving it in and out of files: LitGPT's modules by kind (``modules``), the
adapters themselves (``adapt``), stock LitGPT's adapter layout (``stock``), the one checkpoint loader
(``checkpoint``), bitsandbytes 4-bit on CPU (``quantize``), the crash-safe adapter writer (``export``) and several
devices (``devices``)."""
