//! spindle-kernels: CUDA kernels (`/kernels/*.cu`) compiled to PTX and launched through cudarc.
//! Without the `cuda` feature the crate is deliberately empty so CPU builds need no CUDA.
//! The kernels themselves are not written yet (see crates/kernels/README.md).
