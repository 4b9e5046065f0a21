//! Pure decisions of the data plane, with no I/O and no clock: which target
//! a new connection goes to ([`balance`]), whether a target is healthy after
//! its latest check ([`health`]), and how long a flow waits to stay under a
//! bandwidth limit ([`pace`]). The agent feeds them observations and `now`.
#![forbid(unsafe_code)]

pub mod balance;
pub mod health;
pub mod pace;
