"""The FID checks on the embedded digits model (fastdiff.load()), with the `digits` extractor
against the shipped statistics of scikit-learn's digits:

- its samples score far better than an untrained network's and than noise;
- DPM-Solver++(2M) and UniPC at 10 steps beat DDIM and DDPM at 10 steps, and come within a
  stated margin of DDPM at 1000 steps (too slow to rerun here: its FID is a golden value);
- every step backend (cpu, triton, cuda where present) gives the reference's images to rounding
  and its FID to within the seed-to-seed spread.

The golden numbers were made by scripts/fid_table.py with N samples, seed 0 (see each constant),
for the model whose sha256 is MODEL_SHA256; a retrained model needs them remade.
"""

import functools
import hashlib

import pytest
import torch

from fastdiff import metrics
from fastdiff.checkpoints import DEFAULT_MODEL, Checkpoint, load
from fastdiff.models import UNet
from fastdiff.ops.step import step_op
from fastdiff.samplers import build_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not DEFAULT_MODEL.is_file(),
        reason=f"the embedded model {DEFAULT_MODEL} is not there (made by training)",
    ),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 500  # samples per FID: 10 steps of the digits UNet on 2 CPU cores take ~5-20 s
MODEL_SHA256 = "e2efe33f65db545b20efe90a9437b107294f3c074f91df1fd2fc62fac9c2423e"
# The seed-to-seed spread: standard deviation of the FID of dpmpp_2m at 10 steps over seeds 0-7
# (first N samples of `scripts/fid_table.py --samplers dpmpp_2m unipc ddim ddpm --steps 10
# --long --num 1000 --seeds 0 1 2 3 4 5 6 7`): 2.07.
SEED_SPREAD = 2.07
# Over the same seeds, FID(DDIM or DDPM, 10 steps) - FID(DPM-Solver++ or UniPC, 10 steps), same
# seed, was 2.1 +- 0.8 (DDIM - DPM++), 6.7 +- 3.9 (DDPM - DPM++), 2.9 +- 1.1 (DDIM - UniPC),
# 7.5 +- 4.0 (DDPM - UniPC); the smallest of all 32 gaps was 0.95.
MIN_GAP = 0.5
# DDPM at 1000 steps: the first N samples of seed 0 (`scripts/fid_table.py --samplers --steps
# --long ddpm:1000 --num 500 --seeds 0`, 10 minutes on one CPU thread).
DDPM_1000_FID = 7.898
# How close DPM-Solver++(2M) and UniPC at 10 steps come to DDPM at 1000 steps. Over samples
# 0-999 of seed 0 their FIDs are 5.00 and 4.64 against DDPM-1000's 5.13; on the halves 0-499
# and 500-999 the differences are +2.60 / -2.57 (DPM++) and +2.14 / -3.09 (UniPC), i.e. within
# the seed-to-seed spread. The margin is 1.5 spreads; DDIM at 10 steps (12.50 on samples 0-499)
# is outside it.
MARGIN = 1.5 * SEED_SPREAD


@pytest.fixture(autouse=True)
def _full_fp32(monkeypatch):
    """fp32 convolutions in fp32 on a GPU too (cuDNN's default there is TF32; matmuls already
    default to fp32): the golden values were made on the CPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@functools.cache
def model() -> Checkpoint:
    return load(device=DEVICE)


@functools.cache
def samples(sampler: str, steps: int, backend: str | None = None, n: int = N) -> torch.Tensor:
    if backend is None:  # what dispatch picks, so that the cache sees one run
        return samples(sampler, steps, backends(n)[0], n)
    x = model().sample(n, seed=0, sampler=sampler, steps=steps, backend=backend)
    return x.clamp(-1, 1).cpu()


@functools.cache
def fid(sampler: str, steps: int, backend: str | None = None) -> float:
    return metrics.fid(samples(sampler, steps, backend)).value


@functools.cache
def backends(n: int) -> list[str]:
    """The step backends that can run the sampling loop's calls on CPU tensors of n digits."""
    plan = build_plan("dpmpp_2m", model().schedule, 10, prediction=model().prediction)
    x = torch.zeros(n, *model().sample_shape, device=DEVICE)
    args = (x, x.clone(), None, torch.zeros_like(x), None, plan.table.float())
    kwargs = dict(seed=0, sample_offset=0, guidance=1.0, clamp=None, stochastic=True)
    counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
    return [b for b in step_op.names if not step_op.why_not(b, *args, counter, **kwargs)]


def test_golden_values_belong_to_this_model():
    digest = hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()
    assert digest == MODEL_SHA256, (
        "the embedded model changed: remake DDPM_1000_FID, SEED_SPREAD and MARGIN with "
        "scripts/fid_table.py (commands next to each constant) and set MODEL_SHA256"
    )


def test_trained_model_far_below_untrained_and_noise():
    ckpt = model()
    torch.manual_seed(0)
    untrained = Checkpoint(
        UNet(ckpt.model.config).to(DEVICE).eval(),
        ckpt.schedule,
        ckpt.prediction,
        ckpt.sample_shape,
        None,
    )
    x_untrained = untrained.sample(N, seed=0, sampler="dpmpp_2m", steps=10).clamp(-1, 1).cpu()
    noise = torch.randn(N, *ckpt.sample_shape, generator=torch.Generator().manual_seed(0))
    trained = fid("dpmpp_2m", 10)
    scores = {
        "untrained": metrics.fid(x_untrained).value,
        "noise": metrics.fid(noise.clamp(-1, 1)).value,
    }
    for name, value in scores.items():
        assert trained * 20 < value, f"trained {trained:.2f} vs {name} {value:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("fast", ["dpmpp_2m", "unipc"])
def test_fast_solvers_beat_ddim_and_ddpm_at_10_steps(fast):
    for slow in ("ddim", "ddpm"):
        assert fid(fast, 10) + MIN_GAP < fid(slow, 10), (
            f"{fast} {fid(fast, 10):.2f} vs {slow} {fid(slow, 10):.2f} at 10 steps"
        )


@pytest.mark.slow
@pytest.mark.parametrize("fast", ["dpmpp_2m", "unipc"])
def test_fast_solvers_at_10_steps_close_to_ddpm_at_1000(fast):
    assert fid(fast, 10) <= DDPM_1000_FID + MARGIN, (
        f"{fast} at 10 steps: FID {fid(fast, 10):.2f}; DDPM at 1000 steps: {DDPM_1000_FID:.2f}"
    )


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])  # ddpm: noise drawn in the kernel
def test_step_backends_give_the_reference_images(sampler):
    n = 8  # interpreted Triton is slow
    ref = samples(sampler, 10, "reference", n)
    for backend in backends(n):
        x = samples(sampler, 10, backend, n)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-4, msg=f"{backend} vs reference")


@pytest.mark.slow
def test_step_backends_give_the_reference_fid():
    ref = fid("dpmpp_2m", 10, "reference")
    interpreted = {"triton"} if DEVICE == "cpu" else set()  # Triton on CPU tensors: interpreted
    checked = [b for b in backends(N) if b != "reference" and b not in interpreted]
    for backend in checked:
        assert abs(fid("dpmpp_2m", 10, backend) - ref) < SEED_SPREAD, backend
    if not checked:
        pytest.skip("no fused step backend runs here (interpreted Triton: see the images test)")
