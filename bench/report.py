"""What every bench does last: print its table, and keep table + numbers under $OUT."""
import json
import os


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
