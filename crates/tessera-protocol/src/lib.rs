//! `tessera-protocol`: the bytes Tessera sends between machines (`docs/protocol.md`): the
//! pseudo-gradient codecs (f32, bf16, blockwise int8 and 4-bit, chunked top-k with error
//! feedback), the pseudo-gradient message that carries them, the checkpoint encoding, and the
//! hub's JSON API messages.
//!
//! Everything here works on plain `f32` slices and byte buffers: no libtorch, no I/O, no clock.
//! Every decoder treats its input as hostile and returns a typed error, never panics.

pub mod api;
pub mod codec;
pub mod data;
pub mod pseudograd;
pub mod rule;
pub mod weights;

pub use api::{ApiError, ErrorCode, PROTOCOL_VERSION, RunSpec, TensorSpec};
pub use codec::{Codec, CodecError, ErrorFeedback};
pub use pseudograd::{
    Layout, MessageView, PseudoGradient, TensorEntry, TensorView, WireError, header_bytes, header_bytes_for,
};
pub use rule::Aggregation;
pub use weights::{WeightsError, WeightsLayout, decode_weights, encode_weights, weights_hash};
