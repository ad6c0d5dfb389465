//! Hopper's guest agent: the wire protocol spoken between a host and the agent inside a guest,
//! the agent's request handlers, and the blocking client that hosts (the runner daemon, the
//! test harness) use to drive it.
//!
//! The protocol is newline-delimited JSON over any byte stream (a virtio-console port in a
//! guest, TCP in a test host). See [`protocol`] for the frames.

pub mod client;
pub mod framing;
pub mod handlers;
pub mod protocol;
pub mod server;

pub use client::{AgentClient, Channel, ClientError, Exec};
pub use protocol::{ExecOutput, ExitStatus, PROTOCOL_VERSION};
