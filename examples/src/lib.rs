//! Shared helpers for the example programs (skeleton).
/// The deterministic simulator (`macp-sim`): clients, network, crashes and storage faults around the real kernel.
pub mod sim;
