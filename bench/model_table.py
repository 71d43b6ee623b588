"""Prints the README's model table: parameters, MMACs and activations of every registered model, from shapes alone.

    python bench/model_table.py > /tmp/table.md
"""
from gconv.complexity import counts
from gconv.models import create_model, family_of, list_models


def main() -> None:
    print("| model | input | params | MMACs | acts |")
    print("|---|---|---:|---:|---:|")
    for name in list_models():
        model = create_model(name)
        # a network with a condensed inference form (CondenseNet) is listed as it is deployed, as its papers count it
        label = f"`{name}`" + (", condensed" if hasattr(model, "condensed") else "")
        model = model.clone(condensed=True) if hasattr(model, "condensed") else model
        shape = family_of(model).input_shape(model)
        c = counts(model, shape)
        print(f"| {label} | {shape[0]}x{shape[1]} | {c.params:,} | {c.macs / 1e6:,.1f} | {c.acts:,} |")


if __name__ == "__main__":
    main()
