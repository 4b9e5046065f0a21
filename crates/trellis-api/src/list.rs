//! Lists: the paging every list route takes, the filters some add, and the
//! `{"items": [...], "nextToken": ...}` page they answer.
//!
//! Each query type spells its fields out (no `#[serde(flatten)]`): a query
//! string's values are all text, and only a struct's own numeric fields parse them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::{SubnetId, VpcId};

/// Most items one page may hold (`maxResults`).
pub const MAX_MAX_RESULTS: usize = 1000;
/// Items in a page when `maxResults` is absent.
pub const DEFAULT_MAX_RESULTS: usize = 100;

/// `?maxResults=&nextToken=`: the paging of every list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// At most this many items (1-1000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_results: Option<usize>,
    /// The `nextToken` of the previous page: continue after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// A list query's paging, whatever filters it has.
pub trait Paged {
    fn paging(&self) -> ListQuery;
}

impl Paged for ListQuery {
    fn paging(&self) -> ListQuery {
        self.clone()
    }
}

/// Paging and `?vpcId=`: lists of objects in a VPC (subnets, VPC endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VpcListQuery {
    /// At most this many items (1-1000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_results: Option<usize>,
    /// The `nextToken` of the previous page: continue after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// Only the objects in this VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<VpcId>")]
    pub vpc_id: Option<String>,
}

impl Paged for VpcListQuery {
    fn paging(&self) -> ListQuery {
        ListQuery { max_results: self.max_results, next_token: self.next_token.clone() }
    }
}

/// Paging and `?vpcId=&subnetId=`: the agents list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentListQuery {
    /// At most this many items (1-1000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_results: Option<usize>,
    /// The `nextToken` of the previous page: continue after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    /// Only the agents in this VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<VpcId>")]
    pub vpc_id: Option<String>,
    /// Only the agents in this subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<SubnetId>")]
    pub subnet_id: Option<String>,
}

impl Paged for AgentListQuery {
    fn paging(&self) -> ListQuery {
        ListQuery { max_results: self.max_results, next_token: self.next_token.clone() }
    }
}

/// One page of a list: `{"items": [...], "nextToken": ...}`; `nextToken` is
/// null on the last page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "{T}Page")]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `nextToken` to get the next page; null when this is the last.
    pub next_token: Option<String>,
}
