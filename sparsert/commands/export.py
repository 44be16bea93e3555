"""``sparsert export ARTIFACT -o model.onnx``: ONNX with 2:4 (and INT4) weights, checked before it is kept.

The export and its checks are :func:`sparsert.export.onnx_export.export_artifact`: the graph is written to a
temporary file beside the output, checked (``onnx.checker`` full check, the sparsity annotations against the
weight values, and unless ``--skip-parity`` ONNX Runtime logits against the PyTorch reference) and renamed into
place only when every check passes, so a failed export leaves no output file. Before any work the output is
checked (:func:`sparsert.export.onnx_export.check_output`): it must end in ``.onnx``, lie outside the artifact
directory, and be new or an existing ONNX model (an earlier export, which is replaced); anything else — a
directory, a text file, the artifact's own files — is refused untouched. See docs/ONNX.md.
"""

from __future__ import annotations

import click

from sparsert.commands import option_given


@click.command("export")
@click.argument("artifact", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="ONNX file to write, ending in .onnx and outside ARTIFACT; an existing ONNX model there is "
              "replaced, any other existing file (or a directory) is refused.")
@click.option("--no-kv-cache", is_flag=True, help="Export without past_*/present_* tensors (logits only).")
@click.option("--skip-parity", is_flag=True,
              help="Skip the ONNX Runtime vs PyTorch logits check (ONNX Runtime must still load the graph).")
@click.option(
    "--accuracy-level",
    type=click.Choice(["0", "1", "2", "3", "4", "default"]),
    default="1",
    show_default=True,
    help="ORT MatMulNBits accuracy level for the INT4 parity run (1 = fp32; 'default' = ORT's, which "
    "quantizes activations to int8 and uses a looser tolerance).",
)
def command(artifact: str, output: str, no_kv_cache: bool, skip_parity: bool, accuracy_level: str) -> None:
    """Export ARTIFACT to ONNX (2:4 weights along axis 0 of MatMul B; INT4 as blocked DequantizeLinear),
    run onnx.checker (full check) and the parity check, and print a summary. ARTIFACT may also be a Hugging Face
    directory sparsert wrote (train --model's <run>/hf, compress HF_DIR -o OUT): traced by torch.onnx with the
    same inputs and outputs, checked against transformers' logits."""
    from sparsert.export.onnx_export import export_artifact
    from sparsert.runtime.artifact import is_hf_model_dir

    hf = is_hf_model_dir(artifact)
    if option_given(click.get_current_context(), "accuracy_level"):
        from sparsert.runtime.artifact import read_config
        from sparsert.runtime.errors import ConfigError

        if skip_parity:
            raise ConfigError("--accuracy-level sets ONNX Runtime's MatMulNBits accuracy for the parity run; it has "
                              "no effect with --skip-parity")
        if not (_hf_int4(artifact) if hf else read_config(artifact).get("quantization") is not None):
            raise ConfigError(f"--accuracy-level applies to INT4 artifacts (MatMulNBits); {artifact} is not "
                              "INT4-quantized")
    level = None if accuracy_level == "default" else int(accuracy_level)
    if hf:
        from sparsert.export.hf_export import export_hf_model

        result, notes = export_hf_model(artifact, output, with_kv_cache=not no_kv_cache, parity=not skip_parity,
                                        accuracy_level=level)
        for note in notes:
            click.echo(f"note: {note}", err=True)
        click.echo(result.summary())
        return
    result = export_artifact(
        artifact,
        output,
        with_kv_cache=not no_kv_cache,
        parity=not skip_parity,
        accuracy_level=level,
    )
    click.echo(result.summary())


def _hf_int4(path: str) -> bool:
    """Whether the Hugging Face directory's sparsert.json records INT4 layers."""
    from sparsert.train.hf_model import saved_sparse_layers

    layers = saved_sparse_layers(path) or {}
    return any(info.get("qat_group_size") is not None for info in layers.values())
