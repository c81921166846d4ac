"""Exports at the end of a run: a peft adapter directory and/or a merged HF model directory, each with a model card,
each checked by reloading it with transformers / peft and comparing logits with jaxft's (on the first layers only
when the whole model does not fit in host memory; see `jaxft.train.verify`).

Over an NF4 base (`method.type: qlora`) each check compares like with like. The adapter is loaded by peft on the
dequantised NF4 base (`code * absmax` in fp32, what bitsandbytes' `dequantize_4bit` gives and its Linear4bit
multiplies by), written to a scratch directory, and compared with the trained QLoRA model at the usual tolerance.
The merged export (dequantised, then merged) is checked at the tolerance against jaxft's forward over the merged
tree, and its drift against the trained QLoRA model is reported (summary `merged drift vs NF4 base (rel.)`, the
model card), not judged: rounding `W + s B A` to the export's dtype is an approximation of the quantised model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft import peft, quant
from jaxft.io.default import base_model_id, weights_provenance
from jaxft.io.files import sha256
from jaxft.parallel.distributed import host_array, is_primary
from jaxft.schema import to_dict
from jaxft.train.step import StaticModel
from jaxft.train.verify import plan_verify, probe_logits, truncate, verify_adapter, verify_available, verify_merged

__all__ = ["dataset_files", "export_all", "model_card", "requested_exports", "verify_adapter",
           "verify_available", "verify_merged", "verify_tolerance", "write_dequantized_base"]


def dataset_files(cfg) -> list[tuple[str, str]]:
    """(path, sha256) of every local data file of the run."""
    out = []
    for src in (*cfg.data.train, *cfg.data.eval):
        for p in sorted(glob.glob(src.path)) or [src.path]:
            out.append((p, sha256(p) if os.path.isfile(p) else "not a local file"))
    return out


def model_card(cfg, kind: str, metrics: dict[str, Any], verify: str, notes: list[str]) -> str:
    rows = "\n".join(f"| `{p}` | `{h}` |" for p, h in dataset_files(cfg))
    hp = json.dumps({"method": dict(cfg.method), "optim": to_dict(cfg.optim), "train": to_dict(cfg.train),
                     "seq_len": cfg.data.seq_len}, indent=2)
    m = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    limits = "\n".join(f"- {n}" for n in notes)
    limits = f"\n## Known limits\n{limits}\n" if limits else ""
    return f"""# {kind} trained with jaxft

Base model: `{base_model_id(cfg.model.path)}` (`model.path: {cfg.model.path}`). Method: `{cfg.method_type}`.

Weights: {weights_provenance(cfg.model.path)}.

## Data
| file | sha256 |
|---|---|
{rows}

## Hyper-parameters
```json
{hp}
```

## Metrics
| metric | value |
|---|---|
{m}

## Verification
{verify}
{limits}"""


def _probe(prepared) -> np.ndarray:
    """`ids[B, T]`: the first 64 tokens of up to two eval examples (a train example when there is no eval split)."""
    probe = [np.asarray(ex.ids[:64]) for ex in prepared.eval[:2]] or [np.asarray(prepared.train[0].ids[:64])]
    width = min(len(p) for p in probe)
    return np.stack([p[:width] for p in probe]).astype(np.int32)


def requested_exports(cfg, spec) -> list[str]:
    """The exports the config asks for, by directory name: `adapter` (PEFT methods) and `merged` (always for full
    fine-tuning; never for methods that cannot be merged into the weights: prompt, prefix, Houlsby)."""
    kinds = []
    if spec is not None and cfg.export.adapter:
        kinds.append("adapter")
    if spec is None or (cfg.export.merged and peft.mergeable(spec)):
        kinds.append("merged")
    return kinds


def verify_tolerance(cfg) -> float:
    """export.verify_tolerance, or its default for the run's compute dtype."""
    if cfg.export.verify_tolerance is not None:
        return cfg.export.verify_tolerance
    return 1e-4 if cfg.model.param_dtype == "float32" else 1e-1


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max relative error of `a` against `b` (the export checks' measure): max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def write_dequantized_base(model: StaticModel, frozen: Any, out_dir: str, layers: int | None = None) -> str:
    """Write the NF4 base `frozen` dequantised to float32 (`code * absmax`, unrounded) as an HF directory, cut to its
    first `layers` decoder layers when given: the base peft's adapter check runs on. In float32 it equals
    bitsandbytes' `dequantize_4bit` with an fp32 quant state, and the weights jaxft's float32 forward multiplies
    by. Multi-host: every process calls it (tensors are gathered one at a time), process 0 writes."""
    config = model.config
    if layers is not None:
        cut, _, frozen = truncate(model, None, frozen, layers)
        config = cut.config
    # relabelled, not converted: each NF4 leaf is dequantised only when the writer reaches it
    return jaxft.save_pretrained(config, quant.dequantizing_to(quant.compute_view(frozen), jnp.float32), out_dir,
                                 overwrite=True)


@contextlib.contextmanager
def _quiet():
    """Silence what reloading an export prints on a clean run: transformers' FutureWarnings and its progress bars
    (GGUF conversion, weight loading). Errors still raise."""
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with contextlib.redirect_stderr(io.StringIO()):  # GGUF conversion draws tqdm bars on stderr directly
                yield
    finally:
        transformers.utils.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def export_all(cfg, model: StaticModel, trainable, frozen, tokenizer, prepared, metrics: dict, *,
               kinds: list[str] | None = None) -> dict[str, Any]:
    """Write the exports the config asks for (or only `kinds` of them), verify each, and return summary entries.

    The check of each export loads the whole model into torch when it fits in half of the available host memory,
    else its first layers (export.verify_layers forces the number); the summary's `... verify (checked)` entry and
    the model card say which. An export whose max relative logit error exceeds `verify_tolerance(cfg)` is named in
    the returned `"export failed"` entry (the run then fails). Over an NF4 base (QLoRA) the adapter is checked on
    the dequantised base and the merge against its own forward, its drift from the QLoRA model reported in the
    `"merged drift vs NF4 base (rel.)"` entry (see the module docstring).

    Multi-host: every process calls it (tensors are gathered one at a time, the jaxft side of each check is a
    sharded forward); process 0 alone writes the directories and runs the transformers / peft checks.
    """
    kinds = requested_exports(cfg, model.spec) if kinds is None else kinds
    primary = is_primary()  # multi-host: all processes gather and compute, process 0 writes and checks
    out: dict[str, Any] = {}
    want_verify = cfg.export.verify == "on" or (cfg.export.verify == "auto" and verify_available())
    if cfg.export.verify == "on" and not verify_available():
        out["verify"] = "requested but torch/transformers/peft are not importable (pip install -e '.[verify]')"
        want_verify = False
    tol = verify_tolerance(cfg)
    quantized = frozen is not None and bool(quant.nf4_leaves(frozen))
    ids = _probe(prepared)
    cache: dict[int | None, np.ndarray] = {}
    failed = []

    # jaxft's side computes in float32 whatever the run's compute dtype: the check is about the files, and a bf16
    # forward against torch's fp32 one would measure bf16 rounding instead
    probe_model = dataclasses.replace(model, options=dataclasses.replace(model.options, dtype=jnp.float32))

    def logits(layers: int | None) -> np.ndarray:
        if layers not in cache:
            cache[layers] = probe_logits(probe_model, trainable, frozen, ids, layers)
        return cache[layers]

    def judge(kind: str, err: float, plan) -> str:
        verdict = "within" if err <= tol else "ABOVE"
        if err > tol or not np.isfinite(err):
            failed.append(f"{kind} ({err:.2e} > export.verify_tolerance {tol:.0e})")
        out[f"{kind} verify (rel. err)"] = err
        out[f"{kind} verify (checked)"] = plan.describe()
        print(f"export check, {kind}: max relative logit error {err:.2e}, {verdict} the tolerance {tol:.0e}", flush=True)
        return f"max relative error {err:.2e} ({verdict} the tolerance {tol:.0e})"

    card_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    notes = []
    if "adapter" in kinds:
        d = os.path.join(cfg.output_dir, "adapter")
        t = time.perf_counter()
        print(f"export: writing the adapter to {d}", flush=True)
        # a sharded adapter comes to host memory a leaf at a time (all processes take part), process 0 writes it
        host_adapter = jax.tree.map(host_array, trainable)
        with warnings.catch_warnings():  # the serving caveat is said once, in the summary
            warnings.filterwarnings("ignore", message=".*vLLM will not serve")
            reasons = []
            if primary:
                reasons = peft.save_adapter(model.spec, host_adapter, d, model.config,
                                            base_model_name_or_path=base_model_id(cfg.model.path)) or []
        del host_adapter
        if reasons:
            out["serving"] = "vLLM will not serve this adapter: " + "; ".join(reasons)
        notes += list(reasons)
        check = "not run"
        if want_verify and not peft.peft_loadable(model.spec):
            check = "not run: peft cannot load jaxft's own Houlsby / BitFit adapter format"
        elif want_verify:
            plan = plan_verify(model.config, adapter=trainable, forced=cfg.export.verify_layers)
            on = "the dequantised NF4 base, " if quantized else ""
            print(f"export check, adapter: peft reloads it on {on}{plan.describe()}", flush=True)
            jaxft_logits = logits(plan.layers_arg)  # every process: the forward is a collective
            scratch = tempfile.mkdtemp(prefix=".jaxft-verify-", dir=cfg.output_dir) if primary and quantized else None
            try:
                base = cfg.model.path
                if quantized:  # every process: the writer gathers each tensor
                    base = write_dequantized_base(model, frozen, os.path.join(scratch or cfg.output_dir, "nf4-base"),
                                                  plan.layers_arg)
                if primary:
                    with _quiet():
                        err = verify_adapter(base, d, jaxft_logits, ids, layers=plan.layers_arg)
                    check = (f"peft PeftModel.from_pretrained logits on {on}vs jaxft on {plan.describe()}: "
                             f"{judge('adapter', err, plan)}")
            finally:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
        if primary:
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write(model_card(cfg, "Adapter", card_metrics, check, notes))
        out["adapter"] = d
        out["adapter export (s)"] = time.perf_counter() - t
    if "merged" in kinds:
        d = os.path.join(cfg.output_dir, "merged")
        t = time.perf_counter()
        print(f"export: writing the merged model to {d}", flush=True)
        merged = trainable if model.spec is None else peft.merge(frozen, model.spec, trainable)
        jaxft.save_pretrained(model.config, merged, d, tokenizer)
        plan = plan_verify(model.config, forced=cfg.export.verify_layers) if want_verify else None
        merged_logits = None
        if quantized and want_verify:  # the merge's own forward: what its files must reproduce
            merged_model = dataclasses.replace(probe_model, spec=None)
            merged_logits = probe_logits(merged_model, merged, None, ids, plan.layers_arg)
        del merged
        check = "not run"
        if want_verify:
            print(f"export check, merged: transformers reloads it on {plan.describe()}", flush=True)
            jaxft_logits = logits(plan.layers_arg)  # every process: the forward is a collective
            if primary:
                with _quiet():
                    if merged_logits is None:
                        err = verify_merged(d, jaxft_logits, ids, layers=plan.layers_arg)
                        check = (f"transformers AutoModelForCausalLM logits vs jaxft on {plan.describe()}: "
                                 f"{judge('merged', err, plan)}")
                    else:
                        err = verify_merged(d, merged_logits, ids, layers=plan.layers_arg)
                        drift = _rel(merged_logits, jaxft_logits)  # the files reproduce merged_logits (err)
                        out["merged drift vs NF4 base (rel.)"] = drift
                        print(f"export check, merged: max relative logit drift {drift:.2e} against the trained "
                              "QLoRA model (reported, not judged: the merge rounds W + sBA to the export's dtype)",
                              flush=True)
                        check = (f"transformers AutoModelForCausalLM logits vs jaxft's forward over the merged "
                                 f"weights on {plan.describe()}: {judge('merged', err, plan)}; drift against the "
                                 f"trained QLoRA model (NF4 base + adapter): max relative logit error {drift:.2e}, "
                                 "reported, not judged (the merge rounds W + sBA to the export's dtype)")
        if primary:
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write(model_card(cfg, "Model", card_metrics, check, notes))
        out["merged"] = d
        out["merged export (s)"] = time.perf_counter() - t
    elif cfg.export.merged:
        out["merged"] = f"not written: {peft.method_name(model.spec)} cannot be merged into the weights"
    if failed:
        out["export failed"] = "; ".join(failed)
    return out
