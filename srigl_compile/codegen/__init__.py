"""Everything TVM-specific: kernel definitions, schedule rules, tuning, the torch custom op, targets.

This is the only package that imports ``tvm``, and only when its modules are imported (by ``lower()``), never by
``import srigl_compile``; this ``__init__`` imports nothing.

Map of the CPU kernel core:
    _tvm_compat.py   import_tvm(): TVM 0.27 namespaces, TVM_NUM_THREADS set before first use;
                     import_tvm_runtime(): only what loading kernels needs (runtime-only TVM)
    target.py        resolve_target(): "llvm" / "cuda" / dict; unknown targets are UnsupportedTargetError
    cpu_target.py    host_llvm_target(): {"kind": "llvm", "mcpu": <detected>, "num-cores": n}
    kernels.py       TE definitions: row layout (small batch), col layout (large batch), pack (x -> col tiles),
                     offset layout (direct convolution on the padded input)
    rules.py         RowRule / ColRule / PackRule / OffsetRule: apply(func, target, params) -> Schedule | None
    tuning.py        KernelShape, select_params (records on disk), compile_kernels (cached per process)
    kernel_op.py     build_condensed_linear() -> KernelHandle; torch.ops.srigl_compile.tvm_condensed_linear
    scratch.py       scratch(slot, shape): per-thread reused buffers for kernel temporaries; release_scratch()
    conv_geometry.py direct_plan / column_offsets: where a stride-1 convolution reads (pure maths)
    conv_op.py       build_condensed_conv() -> ConvKernelHandle; torch.ops.srigl_compile.tvm_condensed_conv2d
    kernel_io.py     export_kernels(handles, folder) / load_kernels(folder)
CUDA:
    cuda_kernels.py  definitions per regime: decode (TE), col (TE), expand (TIR); CUDA C; nvcc fatbins
    cuda_rules.py    DecodeRule / ColRule: apply(func, params) -> Schedule | None, variant spaces
    cuda_records.py  CudaVariants / CudaDispatch per shape: GPU-measured records, else a cost model
    cuda_build.py    build_cuda_condensed_linear() -> CudaKernelHandle (same op, same registry); GPU loading
"""
