"""Test exports made of a few freshly exported components laid over a whole export of the same
weights, to keep the test time down."""

import shutil


def same_weights(ours, theirs, names=("vae", "text_encoder", "text_encoder_2")) -> None:
    """Assert that two diffusers pipelines hold the same weights in the named components."""
    import torch

    for name in names:
        if hasattr(theirs, name):
            a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name


def export_onto(base, loaded, names, out, tmp, drop=()):
    """Export only ``names`` of ``loaded`` and lay them over a copy of the export ``base`` at ``out``,
    with one manifest: its own source, pipeline and model index, ``base``'s other components. For
    presets whose other components equal ``base``'s (check with ``same_weights``), to keep test time
    down. ``drop``: components of ``base`` to leave out. Returns the merged manifest."""
    from dataclasses import replace

    from linfusion.export.exporter import export_pipeline
    from linfusion.runtime.manifest import MANIFEST_NAME, file_records, load_manifest

    only = tmp / "only"
    export_pipeline(loaded, only, components=list(names), progress=lambda line: None)
    shutil.copytree(base, out)
    for name in (*names, *drop):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in names:
        shutil.copytree(only / name, out / name)
    shutil.copy(only / "model_index.json", out / "model_index.json")
    own, merged = load_manifest(only), load_manifest(base)
    merged = replace(merged, source=own.source, pipeline=own.pipeline,
                     components={**{n: c for n, c in merged.components.items() if n not in drop},
                                 **{n: own.components[n] for n in names}},
                     parity={**{n: p for n, p in merged.parity.items() if n not in drop},
                             **{n: own.parity[n] for n in names}})
    merged = merged.with_files(file_records(out))
    (out / MANIFEST_NAME).write_text(merged.to_json())
    shutil.rmtree(only)
    return merged
