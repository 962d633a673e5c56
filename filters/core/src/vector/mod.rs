//! The embeddings client and the vector-store client, shared by semantic-cache and rag (one
//! copy: both crates re-export these modules as their own `embeddings`, `store`, `upstream`).
//! Pure request builders and response parsers; the stages send the calls through `Host`.
//! Code a filter does not call is dropped from its `.wasm` at link time.

pub mod embeddings;
pub mod store;
pub mod upstream;
