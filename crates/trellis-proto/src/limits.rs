//! Limits both sides of the agent config rely on: the control plane refuses
//! or fails what exceeds them, and agents enforce them again.

/// Most listening sockets one endpoint may ask of one agent: the sum over its
/// resources of their ports. An endpoint beyond it is failed as a whole (with
/// its reason shown to the consumer), so one provider's resource can never
/// take the listeners another provider's endpoint needs.
pub const MAX_LISTENERS_PER_ENDPOINT: u32 = 1024;
