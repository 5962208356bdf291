"""The compression job, stage by stage: what ``bmrs-compress MODEL`` runs, as one library call.

    load -> (trace -> dependency graph -> coupled groups -> gates) -> fit on data -> dF
         -> keep-masks (no group emptied, widths rounded) -> surgery (shrink, fold E[theta])
         -> proof -> ONNX -> ONNX Runtime -> report -> outputs

``compress(Job(...))`` returns a :class:`Result` with everything the run made; with ``job.out``
it also writes the outputs there, as one set at the end (a failure or an interruption leaves the
folder's earlier set as it was), holding ``out/.bmrs-lock`` for the whole job so that a second job
into the same folder fails at once. It refuses, before any work, an ``out`` where an output would
replace the model or data file, or one holding earlier results (unless ``overwrite`` or
``resume``). The command line only turns options into a :class:`~.job.Job` and prints the result.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import defaults, loading, report, report_html, weights
from .budget import Planner
from .criteria import Decision, apply_decision, criterion_for, decision
from .data import check_fits, head, load_data
from .deploy import Deployment, deploy, plain_network
from .distill import attention_mask, forward, likelihood_text, mean_cosine, model_output, outputs_on
from .errors import BmrsError, DataError, FitError, JobError
from .fit import FitResult, accuracy, distributed_rank, fit
from .gated import attach_gates, gate_bank, unmask
from .imagefolder import options_for
from .inputs import job_inputs, make_inputs
from .job import Job
from .latency_table import TABLE_NAME
from .limits import check_input_bytes
from .outputs import OutLock, ResumeWriter, clean_stale, prepare_out_dir, read_resume_state, write_outputs
from .verify import check_weights, nonfinite_tensor

OUTPUTS = {"pruned_model": "pruned.pt", "onnx": "pruned.onnx", "gated_model": "gated.pt",
           "scores": "scores.csv", "report": "report.json", "html": "report.html"}


@dataclass
class Result:
    """What a compression job made. ``files`` (name -> bytes) is what was written to ``out``
    (or would have been, without one). On a data-parallel rank other than 0 only ``gated`` and
    ``fit`` are set: rank 0 decides, prunes and writes."""

    job: Job
    gated: nn.Module
    fit: FitResult | None = None
    decision: Decision | None = None
    deployment: Deployment | None = None
    report: dict | None = None
    files: dict[str, bytes] | None = None
    out: Path | None = None

    @property
    def pruned(self) -> nn.Module | None:
        return self.deployment.pruned if self.deployment is not None else None


def check_device(device: str) -> None:
    """``device`` names a device this machine has (checked before any work)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise JobError(f"{device}: not a device name (use cpu, cuda or cuda:N)", param="device") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise JobError(f"{device}: CUDA is not available on this machine", param="device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise JobError(f"{device}: this machine has {count} CUDA device(s)", param="device")
        return
    if dev.type == "mps" and torch.backends.mps.is_available():
        return
    raise JobError(f"{device}: unsupported or unavailable device (use cpu, cuda or cuda:N)", param="device")


def resume_key(job: Job, cfg) -> dict:
    """What identifies a fit for ``resume``: the model, data and every fitting option."""
    key = {"model": job.model, "data": job.data, "arch": job.arch, "noise": job.noise, **cfg.__dict__}
    key.pop("device")
    return key


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_out_contents(job: Job, out: Path) -> None:
    """Before any work: no output may replace the model or data file, and ``out`` may hold the
    outputs of an earlier run only with ``overwrite`` (or ``resume``)."""
    for param, spec in (("model", job.model), ("data", job.data)):
        if not spec or not Path(spec).is_file():
            continue
        for name in OUTPUTS.values():
            target = out / name
            if _same_file(Path(spec), target):
                raise JobError(f"{out / name} is the {param} file {spec}: writing the outputs would replace it; "
                               "choose another output folder", param="out")
    earlier = [name for name in OUTPUTS.values() if (out / name).exists()]
    if earlier and not (job.overwrite or job.resume):
        raise JobError(f"{out} holds the results of an earlier run ({', '.join(earlier)}); choose another folder, "
                       "or allow replacing them (overwrite, --overwrite)", param="out")


def input_shape_for(job: Job, loaded, gated: nn.Module, data) -> tuple[int, ...]:
    """One example's shape for export, proof and benchmarks: the data's own when data is given
    (``check_fits`` has run the model on it, so a shape recorded in the file that differs gives way
    to the data), else the one the model file or architecture records."""
    if data is not None:
        return tuple(data.input_shape)
    shape = loaded.input_shape or getattr(gated, "input_shape", None)
    if shape is None:
        raise DataError(f"{job.model}: input shape unknown (give data, or save the model with its input shape)",
                        param="data")
    return tuple(shape)


def image_options_for(job: Job, loaded, weights_info):
    """How an image folder's pictures become the model's inputs (None for other data)."""
    if not str(job.data or "").lower().startswith("imagefolder:"):
        return None
    return options_for(loaded.model, loaded.input_shape, job.image_size, weights_info.normalisation)


FIDELITY_METRIC = "mean cosine to the original outputs"  # the test measure of data without labels


def quality_measure(data, teacher: nn.Module | None):
    """How the report measures a model on the test split: its accuracy with labels; without them,
    the mean cosine of its outputs to ``teacher``'s (the original model's, computed once here)."""
    if data.labelled:
        return lambda model: accuracy(model, data.test)
    reference = outputs_on(teacher, data.test)
    return lambda model: mean_cosine(model, data.test, reference)


def fidelity_section(teacher: nn.Module, data, measured: dict) -> dict:
    """report.json's ``fidelity`` for data without labels: the metric, which outputs, the
    likelihood fitted, and the test split's mean cosines (``measured``: before, gated, after, pruned)."""
    x = head(data.test, 2)
    with torch.no_grad():
        out = model_output(forward(teacher.eval(), x), attention_mask(x))
    return {"metric": FIDELITY_METRIC, "split": "test", "output": out.source,
            "likelihood": likelihood_text(out.kind), **measured}


def compress(job: Job, reporter=None) -> Result:
    """Run ``job`` (see the module docstring); ``reporter`` receives fitting progress
    (:class:`~.progress.RichReporter` or anything with its methods)."""
    job.validate()
    out = Path(job.out) if job.out is not None else None
    if out is not None:
        prepare_out_dir(out, create=False)
    elif job.resume:
        raise JobError("needs an output folder (out) holding the interrupted run", param="resume")
    check_device(job.device)
    if out is None or distributed_rank()[0] != 0:  # one job per folder: rank 0 holds the lock and writes
        if out is not None:
            check_out_contents(job, out)
        return _compress(job, out, reporter)
    with OutLock(out):
        clean_stale(out, OUTPUTS.values())
        check_out_contents(job, out)
        return _compress(job, out, reporter)


def _compress(job: Job, out: Path | None, reporter) -> Result:
    start = time.perf_counter()
    torch.manual_seed(job.seed)  # the seed fixes everything, the initial weights of a fresh network included

    # load
    specs, named = job_inputs(job)  # named inputs (--input/--inputs-file): a gated model, no data
    loaded, weights_info = weights.load_for_job(job)  # the file or architecture, with --weights/--pretrained
    check_weights(loaded.model, job.model)
    if specs and not loaded.gated and not job.data:
        raise JobError(f"{job.model} carries no fitted gates: with named inputs, give token data to fit them "
                       "(--data tokens.npz with one array per input, 'labels' optional), or a model gated and fitted "
                       "with the Python API", param="input" if job.inputs else "inputs_file")
    if specs and job.data:
        from .tokens import load_tokens

        data = load_tokens(job.data, specs, seed=job.seed)  # named inputs: batches are dicts of tensors
    else:
        data = load_data(job.data, seed=job.seed, target=job.target,
                         image=image_options_for(job, loaded, weights_info)) if job.data else None
    if not loaded.gated and data is None:
        raise DataError(f"{job.model} carries no fitted gates: give data to fit them", param="data")
    labelled = data is None or data.labelled
    if not labelled and job.sweep_levels:
        raise JobError("measures accuracy against compression, and token data without 'labels' has no accuracy",
                       param="sweep_levels")
    epochs = job.epochs if job.epochs is not None else (0 if loaded.gated else defaults.EPOCHS)
    acc: dict = {}  # the test measure (accuracy, or without labels the mean cosine) at each stage
    net = loaded.model

    # trace, groups, gates
    teacher = None
    measure = None
    if data is not None:
        if specs:
            from .tokens import check_token_fits

            check_token_fits(plain_network(net) if loaded.gated else net, data)
        else:
            check_fits(net, data)
        if loaded.gated:
            unmask(net)
        if not labelled:  # the likelihood and the test measure: the model as loaded (a gated one: all gates on)
            teacher = copy.deepcopy(net).eval()
        elif job.distill and not loaded.gated:  # --distill: the original network
            teacher = copy.deepcopy(net).eval()
        measure = quality_measure(data, teacher)
        acc["split"] = "test"
        acc["before"] = measure(net)
        if not loaded.gated:
            if specs:  # named inputs: captured with torch.export on random inputs of the specs' sizes
                from .graph.export_trace import analyse_model

                analysis = analyse_model(net, make_inputs(specs, net), tracer="export")
                net = attach_gates(net, analysis=analysis, noise=job.noise)
            else:
                net = attach_gates(net, head(data.train, 2), noise=job.noise)
    gated = net

    # everything checkable is checked before the fit: the input shape (the data's own when data is
    # given: it has just run through the model), and the benchmark's largest input
    shape = tuple(specs[0].shape[1:]) if specs else input_shape_for(job, loaded, gated, data)
    if job.bench_batch_sizes and not specs:
        try:
            check_input_bytes((max(job.bench_batch_sizes),) + tuple(shape), what="a benchmark input of shape")
        except BmrsError as exc:
            raise JobError(exc.message, param="bench_batch_sizes") from None

    # keep-masks are planned (widths, budget) before fine-tuning and for the final decision
    example = make_inputs(specs, plain_network(gated)) if specs else torch.randn((1,) + tuple(shape))
    planner = Planner(job, gated, example, out / TABLE_NAME if out is not None else None)

    # fit
    fit_result = None
    saver = None
    if epochs or (data is not None and job.finetune_epochs and not loaded.gated):
        cfg = job.fit_config(epochs)
        key = resume_key(job, cfg)
        state = read_resume_state(out, key) if job.resume else None
        rank, _ = distributed_rank()
        saver = ResumeWriter(out, key) if out is not None and rank == 0 else None  # one writer: rank 0
        with reporter if hasattr(reporter, "__enter__") else contextlib.nullcontext():  # a live display
            fit_result = fit(gated, data, cfg, reporter, checkpoint=saver, resume=state, teacher=teacher,
                             planner=planner if planner.active else None)
        for name, t in gated.state_dict().items():  # the fit stops on a non-finite loss; this catches the rest
            bad = nonfinite_tensor(t)
            if bad:
                raise FitError(f"after fitting, {name} holds {bad}; nothing written")
        gated.to("cpu")
    elif job.resume:
        raise FitError("this job fits nothing (no epochs, no fine-tuning), so there is nothing to resume", param="resume")
    if distributed_rank()[0] != 0:
        return Result(job, gated, fit_result)  # every rank holds the same fitted model
    if data is not None:
        mask = gate_bank(gated).mask.clone()
        unmask(gated)
        acc["gated"] = measure(gated)
        gate_bank(gated).mask.copy_(mask)
    sweep_result = None
    if job.sweep_levels:
        from .sweep import sweep as run_sweep

        sweep_result = run_sweep(gated, data, levels=job.sweep_levels, precision_bits=job.precision_bits)

    # dF -> keep-masks (no group emptied; rounded widths; the budget met)
    raw = decision(gated, criterion_for(job.prior), precision_bits=job.precision_bits)
    planned = planner(raw)
    key = "accuracy" if labelled else "mean_cosine"  # the planner's points, as the report's measure
    if data is not None and planner.info is not None:  # the measure at BMRS's own stop too
        apply_decision(gated, Decision(raw.criterion, raw.score, planner.bmrs_keep))
        planner.info["bmrs"][key] = measure(gated)
    keep = apply_decision(gated, planned).keep
    dec = Decision(raw.criterion, raw.score, keep)
    if data is not None:
        acc["after"] = measure(gated)
        if planner.info is not None:
            planner.info["budget"][key] = acc["after"]

    # surgery -> proof -> ONNX -> ONNX Runtime
    real = [head(data.test, 64)] if data is not None else []
    real += [named] if named is not None else []
    dep = deploy(gated, keep, (1,) + tuple(shape), real or None, tuple(job.bench_batch_sizes) or None,
                 threads=job.threads, specs=specs, bench_example=named)
    if data is not None:
        acc["pruned"] = measure(dep.pruned)

    # report; everything is serialised in memory first: a failure up to here leaves ``out`` untouched
    rows = report.structure_table(gated, dec)
    buf = io.BytesIO()
    torch.save(dep.pruned, buf)
    fidelity = None if labelled else fidelity_section(teacher, data, {k: v for k, v in acc.items() if k != "split"})
    doc = report.build_report(
        gated=gated, decision=dec, model_spec=job.model, data_spec=job.data, prior=job.prior,
        precision_bits=job.precision_bits, fit_result=fit_result, accuracy=acc if labelled else None,
        wall_time_s=time.perf_counter() - start, outputs=OUTPUTS, deployment=dep, sweep=sweep_result,
        extra={"weights": weights_info.to_dict(), "plan": planner.report(),
               **({"inputs": [str(s) for s in specs]} if specs else {}),
               **({"fidelity": fidelity} if fidelity is not None else {})},
    )
    doc_bytes = report.report_json(doc)
    files = {
        OUTPUTS["pruned_model"]: buf.getvalue(), OUTPUTS["onnx"]: dep.onnx,
        OUTPUTS["gated_model"]: loading.checkpoint_bytes(gated, loaded.arch, None if specs else shape),
        OUTPUTS["scores"]: report.scores_csv(rows), OUTPUTS["report"]: doc_bytes,
        OUTPUTS["html"]: report_html.render(report._finite(doc), rows),
    }
    if planner.table is not None:  # --round-to auto: the measured layer latencies, for later runs
        files[TABLE_NAME] = planner.table.to_bytes()
    if out is not None:
        write_outputs(out, files)
        if saver is not None:  # the job is complete: its own resume state (only) goes
            saver.path.unlink(missing_ok=True)
    return Result(job, gated, fit_result, dec, dep, json.loads(doc_bytes), files, out)
