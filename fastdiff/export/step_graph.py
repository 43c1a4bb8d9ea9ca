"""The whole sampler step as one graph: model call (+ classifier-free guidance) + the step
update of fastdiff.ops.step (the formula of step_reference), with the plan's coefficient table
baked in as a constant.

Inputs:  x (B, C, H, W), step (1,) int64 row index, [context (B, L, D)], [uncond_context
         (B, L, D) with guidance], [class_labels (B,)], noise (B, C, H, W): z for this row,
         i.e. fastdiff.noise.randn_like_batch(seed, step + 1, x.shape), and history
         (n_history, B, C, H, W) when the sampler keeps any (ddim, euler, euler_a keep none).
Outputs: x_next, [new_history].
The loop (OnnxStepRunner.sample) starts from x = init_scale * the noise at step 0 and zero
history and runs the graph for rows 0 .. rows-1; it draws every noise with
fastdiff.ops.noise.gaussian_ (the same values as randn_like_batch, in one pass)."""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.samplers import Col, build_plan
from fastdiff.schedules import Schedule


class StepGraph(nn.Module):
    def __init__(self, model: nn.Module, table: torch.Tensor, n_history: int, guidance=None):
        super().__init__()
        self.model = model
        self.register_buffer("table", table.to(torch.float32).clone())
        self.n_history = n_history
        self.guidance = guidance

    def forward(
        self,
        x,
        step,
        noise,
        history=None,
        context=None,
        uncond_context=None,
        class_labels=None,
    ):
        B = x.shape[0]
        row = torch.index_select(self.table, 0, step.reshape(1))[0]
        c = lambda col: row[int(col)]
        cond = {}
        if class_labels is not None:
            cond["class_labels"] = class_labels
        if self.guidance is not None:
            t = row[int(Col.T)].expand(2 * B)
            y2 = self.model(torch.cat([x, x]), t, context=torch.cat([context, uncond_context]))
            y, y_u = y2[:B], y2[B:]  # not chunk(2): its size guard pins the batch
            yf, yu = y.float(), y_u.float()
            yf = yu + self.guidance * (yf - yu)
        else:
            if context is not None:
                cond["context"] = context
            yf = self.model(x, row[int(Col.T)].expand(B), **cond).float()
        xf = x.float()
        x0 = c(Col.A) * xf + c(Col.B) * yf
        hs = [history[k].float() for k in range(self.n_history)] + [None, None]
        operands = {"X": xf, "D": x0, "H0": hs[0], "H1": hs[1]}

        def combo(prefix):
            out = torch.zeros_like(xf)
            for name, t in operands.items():
                if t is not None:
                    out = out + c(Col[f"{prefix}_{name}"]) * t
            return out

        x_next = (combo("X") + c(Col.X_Z) * noise.float()).to(x.dtype)
        if not self.n_history:
            return x_next
        new = [
            torch.where(c(Col[f"W{k}"]) != 0, combo(f"H{k}"), hs[k]) for k in range(self.n_history)
        ]
        return x_next, torch.stack(new).to(history.dtype)


def export_step(
    model,
    inputs: dict[str, torch.Tensor],
    path,
    *,
    sampler: str,
    steps: int,
    guidance_scale: float | None = None,
    schedule: Schedule | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    opset: int,
    check_ops: bool = True,
    **options,
):
    """to_onnx(..., include_step=True): export StepGraph(model, plan) (see module docstring)."""
    from fastdiff.export.onnx import export_module

    schedule = schedule if schedule is not None else Schedule.from_betas("linear")
    plan_options = {k: options.pop(k) for k in ("spacing", "prediction", "eta") if k in options}
    if options:
        raise TypeError(f"unexpected options for the step graph: {sorted(options)}")
    plan = build_plan(sampler, schedule, steps, **plan_options)
    if guidance_scale is not None and "context" not in inputs:
        raise ValueError("guidance_scale in the step graph needs a cross-attention model")
    x = inputs["sample"]
    named = {
        "x": x,
        "step": torch.tensor([min(1, plan.rows - 1)], dtype=torch.int64, device=x.device),
        "noise": torch.randn_like(x),
    }
    if plan.n_history:
        named["history"] = torch.randn(plan.n_history, *x.shape, dtype=x.dtype, device=x.device)
    if "context" in inputs:
        named["context"] = inputs["context"]
        if guidance_scale is not None:
            named["uncond_context"] = torch.zeros_like(inputs["context"])
    if "class_labels" in inputs:
        named["class_labels"] = inputs["class_labels"]
    batch_dim = {k: 0 for k in named if k != "step"}
    if plan.n_history:
        batch_dim["history"] = 1
    module = StepGraph(model, plan.table, plan.n_history, guidance_scale)
    outputs = ["x_next", "new_history"] if plan.n_history else ["x_next"]
    meta = {
        "fastdiff.kind": "step",
        "fastdiff.sampler": sampler,
        "fastdiff.steps": steps,
        "fastdiff.rows": plan.rows,
        "fastdiff.n_history": plan.n_history,
        "fastdiff.init_scale": repr(float(plan.init_scale)),
        "fastdiff.prediction": plan.prediction,
        "fastdiff.guidance_scale": "none"
        if guidance_scale is None
        else repr(float(guidance_scale)),
    }
    return export_module(
        module,
        named,
        path,
        output_names=outputs,
        batch_dim=batch_dim,
        dynamic_batch=dynamic_batch,
        dynamic_spatial=dynamic_spatial,
        opset=opset,
        metadata=meta,
        check_ops=check_ops,
    )
