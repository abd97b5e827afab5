"""The causal-LM parts of the evaluation reports: text scores, greedy continuations and generation speed of every
row, side by side with the artifact's ratios to the baseline."""

from __future__ import annotations

from typing import Any

__all__ = ["md_lm", "lm_summary"]


def _n(value: Any, fmt: str = ".2f", unit: str = "") -> str:
    return "–" if value is None else format(value, fmt) + unit


def _name(row: dict[str, Any]) -> str:
    return row["label"]


def md_lm(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: the text table, then time to first token and decoding speed per configuration."""
    rows = [r for r in results if r.get("lm")]
    if not rows:
        return []
    lines = ["## Language model", "",
             "| model | device | perplexity | increase | next-token top-1 | agreement | KL (nats) "
             "| greedy identical | greedy tokens equal |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lm, ratios = row["lm"], row.get("ratios") or {}
        top1 = (row.get("accuracy") or {}).get("value")
        greedy = lm.get("greedy") or {}
        exact = f"{greedy['exact']}/{greedy['prompts']}" if greedy else "–"
        lines.append(f"| {_name(row)} | {row['device']} | {_n(lm.get('perplexity'), '.3f')} "
                     f"| {_n(ratios.get('perplexity_increase'), '+.2f', ' %')} | {_n(top1, '.2f', ' %')} "
                     f"| {_n(lm.get('token_agreement'), '.2f', ' %')} | {_n(lm.get('kl_mean'), '.4g')} | {exact} "
                     f"| {_n(greedy.get('tokens_equal'), '.1f', ' %')} |")
    first = next((r["lm"].get("greedy") for r in rows if r["lm"].get("greedy")), None)
    tokens = rows[0]["lm"].get("tokens")
    lines += ["", f"Scored on {tokens:,} next tokens of the evaluation text; agreement and KL are to the baseline's "
              "distribution at every position"
              + (f"; greedy continuations of {first['prompts']} prompts of {first['prompt_tokens']} tokens, "
                 f"{first['new_tokens']} new tokens each." if first else "."), ""]
    lines += _md_speed(rows, "ttft", "Time to first token (batch 1; median ms, alternating)", "prompt tokens",
                       "prompt_tokens", ".1f", "ms")
    lines += _md_speed(rows, "decode", "Decoding with the KV cache (median tokens/s, alternating)", "batch",
                       "batch_size", ",.1f", "tokens/s")
    return lines


def _md_speed(rows: list[dict[str, Any]], kind: str, title: str, column: str, key: str, fmt: str,
              unit: str) -> list[str]:
    if not any(r["lm"].get(kind) for r in rows):
        return []
    lines = [f"### {title}", "", f"| device | {column} | model | {unit} | IQR | speedup (IQR of rounds) |",
             "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        for entry in row["lm"].get(kind) or []:
            speed = "" if entry.get("speedup") is None else (
                f"**{entry['speedup']:.2f}×** ({_n(entry.get('speedup_q25'))}–{_n(entry.get('speedup_q75'))})")
            lines.append(f"| {row['device']} | {entry[key]} | {_name(row)} | {format(entry['median'], fmt)} "
                         f"| {format(entry['iqr'], fmt)} | {speed} |")
    return lines + ["", "Speedups above 1× favour the artifact.", ""]


def lm_summary(base: dict[str, Any], art: dict[str, Any]) -> list[str]:
    """Terminal summary parts of one artifact row of a causal LM."""
    lm, ratios = art.get("lm"), art.get("ratios") or {}
    if not lm or not base.get("lm"):
        return []
    parts = [f"perplexity {base['lm']['perplexity']:.2f} -> {lm['perplexity']:.2f} "
             f"({ratios.get('perplexity_increase', 0.0):+.2f} %)"]
    if lm.get("token_agreement") is not None:
        parts.append(f"agreement {lm['token_agreement']:.1f} %")
    greedy = lm.get("greedy")
    if greedy:
        parts.append(f"greedy {greedy['exact']}/{greedy['prompts']} identical")
    if ratios.get("decode_speedup") is not None:
        parts.append(f"decode {ratios['decode_speedup']:.2f}x")
    return parts
