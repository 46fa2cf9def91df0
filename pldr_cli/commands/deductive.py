"""pldr inspect-deductive (alias: pldr inspect): the deductive outputs A_LM, A_P, G_LM in float64."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, fail, handle_errors, is_terminal

EPILOG = """Examples:

  pldr inspect-deductive runs/tiny/final

  pldr inspect runs/tiny/final --prompt "The cat sat" --prompt "" --json inspect.json

  pldr inspect runs/tiny/final --prompts-file prompts.txt --plots plots/ --dump deductive.safetensors

  pldr inspect runs/tiny/final --data data/tok --samples 16 --gcache gcache.safetensors

An empty --prompt (or a blank line in --prompts-file) is the EOS token alone, the prompt export-gcache
uses by default. Without prompts: the EOS-only prompt plus a few built-in sentences.
"""

HELP = ("Per layer and head, in float64: det, log|det|, rank, RMSE across prompts, asymmetry, min entry "
        "and DAG terms of A_LM, A_P and G_LM, and how exactly the KV/G caches reproduce them.")


def register(app: typer.Typer) -> None:
    app.command("inspect-deductive", epilog=EPILOG, help=HELP)(inspect_deductive)
    app.command("inspect", epilog=EPILOG, help="Alias of inspect-deductive.")(inspect_deductive)


def _num(x, sep: str = " / ") -> str:
    if x is None:
        return "-"
    if isinstance(x, (tuple, list)):
        return sep.join(_num(v) for v in x)
    if isinstance(x, int):
        return str(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return f"{x:.3g}"


def _agree(a: dict) -> str:
    if a["identical"]:
        return "identical (0.0)"
    return f"{a['max_abs_diff']:.3e} ({a['equal_decimals']} equal decimals)"


@handle_errors
def inspect_deductive(
    model: Path = typer.Argument(..., help="Model directory, HF pldrllm directory or .pth file."),
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeatable; '' = EOS alone)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="One prompt per line."),
    data: Path = typer.Option(None, "--data", help="A token data folder (pldr tokenize): sample rows."),
    samples: int = typer.Option(8, "--samples", help="With --data: how many rows to sample."),
    seed: int = typer.Option(0, "--seed", help="With --data: seed of the row sample."),
    max_len: int = typer.Option(None, "--max-len", help="Cut prompts to this many tokens "
                                "(default: the model's context minus --new-tokens)."),
    gcache: Path = typer.Option(None, "--gcache", help="A G-cache file to compare against."),
    force: bool = typer.Option(False, "--force", help="Accept a G-cache made from another model."),
    new_tokens: int = typer.Option(4, "--new-tokens", help="Decode steps for the logit comparison."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (float64 either way)."),
    json_out: Path = typer.Option(None, "--json", help="Write every figure per layer and head here."),
    dump: Path = typer.Option(None, "--dump", help="Write the tensors here (safetensors)."),
    plots: Path = typer.Option(None, "--plots", help="Write PNG heatmaps of G_LM and the RMSE plot here."),
) -> None:
    import torch

    from pldr_core import deductive as lib
    from pldr_core.checkpoint import load_config, load_model
    from pldr_core.errors import PLDRError

    # Validate everything cheap before loading weights.
    cfg = load_config(model)
    if prompts_file is not None and not prompts_file.is_file():
        raise fail(f"prompts file not found: {prompts_file}")
    if gcache is not None and not gcache.is_file():
        raise fail(f"G-cache file not found: {gcache}")
    if data is not None and not data.is_dir():
        raise fail(f"data folder not found: {data}")
    if new_tokens < 1:
        raise fail("--new-tokens must be at least 1")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise fail(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device is available")
    for out in (json_out, dump):
        if out is not None and out.is_dir():
            raise fail(f"{out} is a folder; give a file path")
    if plots is not None and plots.exists() and not plots.is_dir():
        raise fail(f"--plots {plots} exists and is not a folder")
    limit = max_len if max_len is not None else max(1, cfg.max_seq_len - new_tokens)
    if limit < 1:
        raise fail("--max-len must be at least 1")

    from pldr_core.tokenizer import Tokenizer, model_tokenizer_path

    tok_file = model_tokenizer_path(model)
    tokenizer = Tokenizer(tok_file) if tok_file.is_file() else None
    prompts = lib.collect_prompts(eos_id=cfg.eos_id, tokenizer=tokenizer, prompts=prompt,
                                  prompts_file=prompts_file, data_dir=data, samples=samples, seed=seed,
                                  max_len=limit)
    for p in prompts:
        bad = [t for t in p.ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise PLDRError(f"prompt {p.label!r} has token id {bad[0]} outside the model's vocabulary "
                            f"({cfg.vocab_size}); was the data tokenized with this model's tokenizer?")

    m = load_model(model, device=device, dtype=torch.float64)
    g = None
    if gcache is not None:
        from pldr_core.gcache import read_gcache

        g = read_gcache(gcache, m, force=force) if cfg.has_metric_path else None

    err = console(stderr=True)
    if is_terminal():
        from rich.progress import Progress

        with Progress(transient=True, console=err) as bar:
            task = bar.add_task("inspecting", total=len(prompts))
            result = lib.inspect_deductive(m, prompts, gcache=g, new_tokens=new_tokens,
                                           progress=lambda done, total: bar.update(task, completed=done))
    else:
        result = lib.inspect_deductive(m, prompts, gcache=g, new_tokens=new_tokens)
    if gcache is not None and g is None:
        result.report["notes"].append("--gcache ignored: the model has no metric path")

    written = []
    if json_out is not None:
        written.append(("json", lib.write_json(json_out, result.report)))
    if dump is not None:
        written.append(("dump", lib.write_dump(dump, result)))
    if plots is not None:
        for path in lib.write_plots(plots, result):
            written.append(("plot", path))
    _render(result.report, written)


def _render(report: dict, written: list) -> None:
    from rich.table import Table

    from pldr_core.deductive import summary_rows

    c = console()
    c.soft_wrap = True
    rows = summary_rows(report)
    n = len(report["prompts"])
    title = (f"deductive outputs, g_mode {report['g_mode']}, {report['dtype']}, {n} prompt(s); heads "
             f"summarised: means, det min..max, rank min")
    if is_terminal():
        wide = c.width >= 140
        keys = [k for k in rows[0]["tensors"][report["tensors"][0]]
                if wide or k not in ("det min..max", "min", "cache |diff|")]
        table = Table(title=title, title_justify="left")
        table.add_column("layer", justify="right")
        table.add_column("tensor")
        for key in keys:
            table.add_column(key, justify="right")
        for row in rows:
            names = list(row["tensors"])
            cells = ["\n".join(_num(row["tensors"][nm][k], "..") for nm in names) for k in keys]
            table.add_row(str(row["layer"]), "\n".join(names), *cells, end_section=True)
        c.print(table)
    else:
        c.print(title)
        for row in rows:
            for nm, figs in row["tensors"].items():
                c.print(f"  layer {row['layer']} {nm}: " + "; ".join(f"{k} {_num(v, '..')}"
                                                                    for k, v in figs.items()))
    for note in report["notes"]:
        c.print(f"note: {note}")
    fid = report["fidelity"]
    c.print(f"cache fidelity (cached path vs uncached forward, float64; reference decode mode "
            f"{fid['reference']}, {fid['new_tokens']} teacher-forced steps):")
    for nm, a in fid["deductive"].items():
        worst = max(fid["stats"][nm].items(), key=lambda kv: kv[1]["max_abs_diff"])
        stats = ("identical" if worst[1]["max_abs_diff"] == 0 else
                 f"max |diff| {worst[1]['max_abs_diff']:.3e} ({worst[0]})")
        c.print(f"  {nm}: tensors {_agree(a)}; statistics {stats}")
    for mode, a in fid["logits"].items():
        c.print(f"  logits {mode} vs {fid['reference']}: max |diff| {_agree(a)}, first step "
                f"{a['first_step_max_abs_diff']:.3e}, argmax equal: {a['argmax_equal']}")
    c.print("  DAG terms (mean over layers): " + ", ".join(f"{k} {_num(v)}" for k, v in report["dag_terms"].items()))
    if "gcache_file" in report:
        c.print("  G-cache file against each prompt (max over layers and heads): |G_LM(file) - G_LM(prompt)|, "
                "|logits(KV + file G) - logits(KV + prefill G)|:")
        for p, prompt in enumerate(report["prompts"]):
            g = max(e["gcache_file"]["G_LM"]["per_prompt_max_abs_diff"][p] for e in report["entries"])
            lg = fid["logits"]["kv+gfile"]["per_prompt_max_abs_diff"][p]
            c.print(f"    {prompt['label'][:40]!r}: G_LM {g:.3e}, logits {lg:.3e}")
    for kind, path in written:
        c.print(f"wrote {kind}: {path}")
