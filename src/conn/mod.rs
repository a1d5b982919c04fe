//! A connection's life: what its handler is given ([`connection`]), the stages it passes before
//! and after the handler ([`stages`]), and the task that runs them ([`task`]).

pub(crate) mod connection;
pub(crate) mod stages;
pub(crate) mod task;
