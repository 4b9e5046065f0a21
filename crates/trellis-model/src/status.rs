//! Lifecycle states and their allowed transitions (AWS names and spellings).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot move a {what} from {from} to {to}")]
pub struct TransitionError {
    pub what: &'static str,
    pub from: String,
    pub to: String,
}

/// Status of resource gateways and resource configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResourceStatus {
    CreateInProgress,
    Active,
    UpdateInProgress,
    DeleteInProgress,
    CreateFailed,
    UpdateFailed,
    DeleteFailed,
}

pub type GatewayStatus = ResourceStatus;
pub type ConfigurationStatus = ResourceStatus;

impl ResourceStatus {
    pub fn can_move_to(self, to: Self) -> bool {
        use ResourceStatus::*;
        matches!(
            (self, to),
            (CreateInProgress, Active | CreateFailed)
                | (Active, UpdateInProgress | DeleteInProgress)
                | (UpdateInProgress, Active | UpdateFailed)
                | (UpdateFailed, UpdateInProgress | DeleteInProgress)
                | (CreateFailed, DeleteInProgress)
                | (DeleteInProgress, DeleteFailed)
                | (DeleteFailed, DeleteInProgress)
        )
    }

    pub fn transition(self, to: Self) -> Result<Self, TransitionError> {
        if self.can_move_to(to) {
            Ok(to)
        } else {
            Err(TransitionError { what: "resource", from: self.to_string(), to: to.to_string() })
        }
    }

    /// Whether traffic may flow through an object in this status.
    pub fn is_serving(self) -> bool {
        matches!(self, ResourceStatus::Active | ResourceStatus::UpdateInProgress | ResourceStatus::UpdateFailed)
    }
}

impl fmt::Display for ResourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ResourceStatus::CreateInProgress => "CREATE_IN_PROGRESS",
            ResourceStatus::Active => "ACTIVE",
            ResourceStatus::UpdateInProgress => "UPDATE_IN_PROGRESS",
            ResourceStatus::DeleteInProgress => "DELETE_IN_PROGRESS",
            ResourceStatus::CreateFailed => "CREATE_FAILED",
            ResourceStatus::UpdateFailed => "UPDATE_FAILED",
            ResourceStatus::DeleteFailed => "DELETE_FAILED",
        };
        f.write_str(s)
    }
}

/// State of a VPC endpoint.
///
/// `Pending` at creation; an agent's report moves it to `Available` (listener
/// ready) or `Failed` (with a reason), and back as listeners recover or fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum EndpointState {
    PendingAcceptance,
    Pending,
    Available,
    Rejected,
    Failed,
    Deleting,
}

impl EndpointState {
    pub fn can_move_to(self, to: Self) -> bool {
        use EndpointState::*;
        matches!(
            (self, to),
            (PendingAcceptance, Pending | Rejected | Deleting)
                | (Pending, Available | Failed | Rejected | Deleting)
                | (Available, Failed | Pending | Rejected | Deleting)
                | (Failed, Available | Pending | Rejected | Deleting)
                | (Rejected, Deleting)
        )
    }

    pub fn transition(self, to: Self) -> Result<Self, TransitionError> {
        if self == to || self.can_move_to(to) {
            Ok(to)
        } else {
            Err(TransitionError { what: "VPC endpoint", from: self.to_string(), to: to.to_string() })
        }
    }
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Status of a resource share invitation: only `PENDING` ever moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InvitationStatus {
    Pending,
    Accepted,
    Rejected,
}

impl InvitationStatus {
    pub fn transition(self, to: Self) -> Result<Self, TransitionError> {
        match (self, to) {
            (InvitationStatus::Pending, InvitationStatus::Accepted | InvitationStatus::Rejected) => Ok(to),
            _ => Err(TransitionError { what: "resource share invitation", from: self.to_string(), to: to.to_string() }),
        }
    }
}

impl fmt::Display for InvitationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvitationStatus::Pending => "PENDING",
            InvitationStatus::Accepted => "ACCEPTED",
            InvitationStatus::Rejected => "REJECTED",
        })
    }
}

/// Status of a resource share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShareStatus {
    Active,
    Deleting,
}

/// Whether an agent talks to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AgentStatus {
    Online,
    Offline,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_go_from_create_in_progress_to_active_and_not_back() {
        use ResourceStatus::*;
        assert_eq!(CreateInProgress.transition(Active), Ok(Active));
        assert!(CreateInProgress.transition(CreateFailed).is_ok());
        assert!(Active.transition(CreateInProgress).is_err());
        assert!(CreateFailed.transition(Active).is_err());
        assert!(Active.transition(DeleteInProgress).is_ok());
        assert!(DeleteInProgress.transition(Active).is_err());
        assert!(Active.is_serving() && !CreateInProgress.is_serving() && !DeleteInProgress.is_serving());
        assert_eq!(serde_json::to_string(&CreateInProgress).unwrap(), "\"CREATE_IN_PROGRESS\"");
        assert_eq!(CreateInProgress.to_string(), "CREATE_IN_PROGRESS");
    }

    #[test]
    fn endpoints_go_pending_to_available_or_failed_then_deleting() {
        use EndpointState::*;
        assert!(Pending.transition(Available).is_ok());
        assert!(Pending.transition(Failed).is_ok());
        assert!(Available.transition(Failed).is_ok());
        assert!(Failed.transition(Available).is_ok());
        assert!(Available.transition(Deleting).is_ok());
        assert!(Deleting.transition(Available).is_err());
        assert!(Deleting.transition(Pending).is_err());
        assert!(Rejected.transition(Available).is_err());
        assert!(Pending.transition(PendingAcceptance).is_err());
        assert_eq!(serde_json::to_string(&PendingAcceptance).unwrap(), "\"PendingAcceptance\"");
    }

    #[test]
    fn invitations_move_only_from_pending() {
        use InvitationStatus::*;
        assert_eq!(Pending.transition(Accepted), Ok(Accepted));
        assert_eq!(Pending.transition(Rejected), Ok(Rejected));
        for from in [Accepted, Rejected] {
            for to in [Pending, Accepted, Rejected] {
                assert!(from.transition(to).is_err(), "{from} -> {to}");
            }
        }
        assert!(Pending.transition(Pending).is_err());
        assert_eq!(serde_json::to_string(&Accepted).unwrap(), "\"ACCEPTED\"");
    }
}
