//! `tessera-protocol`: the bytes Tessera sends between machines. Today: the pseudo-gradient
//! codecs (f32, bf16, blockwise int8 and 4-bit, chunked top-k with error feedback) and the
//! pseudo-gradient message that carries them (`docs/protocol.md`).
//!
//! Everything here works on plain `f32` slices and byte buffers: no libtorch, no I/O, no clock.
//! Every decoder treats its input as hostile and returns a typed error, never panics.

pub mod codec;
pub mod pseudograd;

pub use codec::{Codec, CodecError, ErrorFeedback};
pub use pseudograd::{MessageView, PseudoGradient, TensorEntry, TensorView, WireError};
