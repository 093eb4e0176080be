"""`--torch-compile`: compile each transformer layer in place, as torchtitan does, not the whole step.

    compile_layers(chunks, mode="default")   # after the methods transformed the model, before training

Why per layer: the layers of a model are the same code on same-shaped tensors, so the graphs dynamo traces and
inductor compiles for one serve them all (a llama-tiny run with 10 layers captures 2 graphs); the
embedding, the vocab-parallel cross entropy, the pipeline schedule, gradient sync and the optimizer stay eager,
so nothing there has to be traceable. Why in place (`nn.Module.compile`, not `torch.compile(module)`): the
module tree and the parameter names stay as they are (no `_orig_mod.` prefix), so checkpoints of compiled and
eager runs are interchangeable and every method hook finds its modules where it left them.

Collectives inside a layer (the tensor/sequence-parallel mappings of `parallel/mappings.py`) are graph breaks
(`torch.compiler.disable`): gloo collectives cannot be traced, and the segments between them are compiled.
Ring attention's send/recv (context parallelism) break the graph by themselves.

On CPU inductor generates C++ and needs a C++ compiler at run time; `check_cpp_compiler` says so before a
run starts rather than at the first forward.
"""

from __future__ import annotations


def compile_layers(chunks, mode: str = "default") -> None:
    """`layer.compile(mode=mode)` on every transformer layer of `chunks` (this rank's model chunks), in place."""
    for chunk in chunks:
        for layer in chunk.decoder.layers.values():
            layer.compile(mode=mode)


def check_cpp_compiler() -> None:
    """FileNotFoundError unless inductor finds a C++ compiler (`$CXX`, else g++): CPU code generation needs one."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        raise FileNotFoundError(
            "--torch-compile on CPU needs a C++ compiler (inductor generates C++): none found ($CXX, else g++); "
            "install g++ or set CXX, or run without --torch-compile") from error
