//! spindle-kernels: spindle's own CUDA kernels (`/kernels/*.cu`), compiled to PTX by nvcc at build
//! time and launched through cudarc on candle's CUDA device and stream.
//!
//! - [`plan`] (always built, no CUDA): turns one step's batch into launch data for the attention
//!   kernels, so the routing and validation rules are tested on every machine.
//! - With the `cuda` feature: [`ptx`] (the embedded PTX), [`attention`] (paged KV cache writes,
//!   decode and prefill attention, block copies) and [`ops`] (fused RMSNorm, rotary embedding,
//!   SiLU-and-mul on candle tensors).
//!
//! Without the `cuda` feature nothing here touches CUDA, so CPU builds need no toolkit.

pub mod error;
pub mod plan;

pub use error::{KernelError, Result};

#[cfg(feature = "cuda")]
pub mod ptx {
    //! The PTX of every `/kernels/*.cu` module, embedded at build time by `build.rs`.
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

#[cfg(feature = "cuda")]
mod launch;

#[cfg(feature = "cuda")]
pub mod attention;

#[cfg(feature = "cuda")]
pub mod ops;

#[cfg(feature = "cuda")]
pub use launch::{set_poison_outputs, KernelFloat};
