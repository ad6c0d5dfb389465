//! The vocabulary the scheduler and its runner hosts share: what goes over the host API (a
//! host's enrollment, its assignments, its status reports, its job logs), what the operator API
//! shows (jobs and hosts with their states), the VM shapes jobs ask for, the limits both sides
//! enforce, and the one secret type both use. Defined once here so the two sides cannot drift.

pub mod evacuation;
pub mod host;
pub mod job;
pub mod logs;
pub mod secret;
pub mod shape;

pub use evacuation::{
    InterruptOrder, Migration, MigrationMode, MigrationReport, MigrationResult, MigrationStats,
    NoticeKind, NoticeReport, Order, ReceiveOrder, SendOrder,
};
pub use host::{
    Assignment, CertificateRequest, Enrolled, Host, HostState, IssuedCertificate, NewHost,
    StatusReport,
};
pub use job::{is_local_job_id, transition, Backwards, Job, JobState, Transition, VmState};
pub use logs::{LogInfo, LogName};
pub use secret::Secret;
pub use shape::Shape;
