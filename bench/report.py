"""What the benches share: the measured copy ceiling, and the report every bench ends with."""
import json
import os


def copy_ceiling_tbs(device: str = "cuda") -> float:
    """A 1 GiB device-to-device copy, triton's do_bench median: bytes read + written over
    time, TB/s. The ceiling memory-bound benches print beside their GB/s."""
    import torch  # here, not above: bench_serve's client process imports this file without torch
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e9


def markdown(rows: list[dict]) -> str:
    """Rows of dicts as markdown tables: a new header wherever the keys change."""
    lines = []
    for i, row in enumerate(rows):
        if i == 0 or row.keys() != rows[i - 1].keys():
            lines += ["", "| " + " | ".join(row) + " |", "|" + "---|" * len(row)]
        lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def report(name: str, table: str, record: dict) -> None:
    """Print `table`; with $OUT set, write $OUT/<name>.md and $OUT/<name>.json."""
    print("\n" + table)
    out_dir = os.environ.get("OUT")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
