//! TCP port ranges as written in the API: `"5432"` or `"8000-8100"`, 1–65535.
//!
//! The type lives in `trellis-model` (where the API validates it) and is
//! re-exported here so the agent config and the API share one type.

pub use trellis_model::ports::{PortRange, PortRangeError};
