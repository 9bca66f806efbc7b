//! One error type for the kernel layer, so callers can tell a bad batch (their bug or a user's
//! input) from a CUDA failure (the device's or the driver's).

/// Errors from planning or launching spindle's kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The batch description is inconsistent (ranges, block tables, shapes).
    #[error("invalid attention batch: {0}")]
    InvalidBatch(String),
    /// A tensor has a shape, dtype, layout or device the kernels do not take.
    #[error("unsupported input: {0}")]
    Unsupported(String),
    /// A candle operation failed (allocation, copy, or a candle-side CUDA error).
    #[cfg(feature = "cuda")]
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The CUDA driver reported an error (launch failure, out of memory, ...).
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, KernelError>;
