"""What a lowered model needs at run time, importable with torch and the runtime-only TVM (no compiler, no LLVM).

Nothing here imports ``srigl_compile.codegen`` (the compile side: TE definitions, rules, tuning, builds), and
``tvm`` is imported only when a kernel is loaded or run; this ``__init__`` imports nothing.

    spec.py           KernelSpec: a kernel's shape, k padding, registry key, symbols, record names, operand packing
    handle.py         the KernelHandle protocol and the fields every handle shares
    registry.py       the process-wide handle registry (key -> handle) the torch operators look kernels up in
    checks.py         typed input errors and checks shared by the operators and handles
    linear_op.py      torch.ops.srigl_compile.tvm_condensed_linear (any handle with ``launch``)
    conv_op.py        torch.ops.srigl_compile.tvm_condensed_conv2d (the direct CPU convolution)
    llvm_params.py    RowParams / ColParams: the CPU kernels' compiled variants
    llvm_linear.py    LlvmLinearHandle: row / mid / col / fused kernels picked per call by batch size
    llvm_conv.py      LlvmConvHandle: the offset kernel and its per-layer offsets cache
    cuda_params.py    DecodeParams / ColParams, CudaVariants, CudaDispatch (decode / col / dense by batch)
    cuda_linear.py    CudaLinearHandle: fatbins handed to TVM's loader, launches on torch's stream
    kernel_files.py   folder and file checks for kernel folders (KernelFileError)
    kernel_io.py      export_kernels / load_kernels: libraries + manifest, each entry loaded by its handle type
    scratch.py        per-thread reused buffers for the kernels' temporaries
    call_record.py    a forward recorded as its kernel calls and memory-writing aten ops, and its replay
    out_overloads.py  a functional aten op's out= overload (a replay writes the recorded result through it)
    conv_geometry.py  where a direct convolution reads in the padded input or its phase images (pure maths)
    cpu_features.py   the host CPU's instruction sets (kernels built for more would die of SIGILL)
    tvm_runtime.py    import_tvm_runtime(), TVM's thread count
"""
