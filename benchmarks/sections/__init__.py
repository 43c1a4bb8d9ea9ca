"""Benchmark sections, in the order run.py runs them. Each is a module with
`cases(ctx) -> list[Case]` and optional `NOTES` (see harness.py)."""

from sections import attention, group_norm, sampling, step, unet

SECTIONS = {
    "step": step,
    "attention": attention,
    "group_norm": group_norm,
    "unet": unet,
    "sampling": sampling,
}
