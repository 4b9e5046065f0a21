//! Lists: the paging every list route takes, the filters some add, and the
//! `{"items": [...], "nextToken": ...}` page they answer.
//!
//! [`list_query!`] writes the paging fields into each query type rather than
//! flattening a shared struct: a query string's values are all text, and
//! only a struct's own numeric fields parse them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_model::VpcId;

/// Most items one page may hold (`maxResults`).
pub const MAX_MAX_RESULTS: usize = 1000;
/// Items in a page when `maxResults` is absent.
pub const DEFAULT_MAX_RESULTS: usize = 100;

/// A list query: the paging every list takes (`maxResults`, `nextToken`)
/// and the filters given, all optional, with [`Paged`].
///
/// ```ignore
/// list_query! {
///     /// Paging and `?vpcId=`.
///     VpcListQuery {
///         /// Only the objects in this VPC.
///         #[schemars(with = "Option<VpcId>")]
///         vpc_id: Option<String>,
///     }
/// }
/// ```
macro_rules! list_query {
    ($(#[$doc:meta])* $name:ident { $($(#[$field_attr:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// At most this many items (1-1000, default 100).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(range(min = 1, max = 1000))]
            pub max_results: Option<usize>,
            /// The `nextToken` of the previous page: continue after it.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub next_token: Option<String>,
            $(
                $(#[$field_attr])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: $ty,
            )*
        }

        impl $crate::list::Paged for $name {
            fn paging(&self) -> $crate::list::ListQuery {
                $crate::list::ListQuery { max_results: self.max_results, next_token: self.next_token.clone() }
            }
        }
    };
}
pub(crate) use list_query;

/// A list query's paging, whatever filters it has.
pub trait Paged {
    fn paging(&self) -> ListQuery;
}

list_query! {
    /// `?maxResults=&nextToken=`: the paging of every list.
    ListQuery {}
}

list_query! {
    /// Paging and `?vpcId=`: lists of objects in a VPC (subnets, VPC endpoints).
    VpcListQuery {
        /// Only the objects in this VPC.
        #[schemars(with = "Option<VpcId>")]
        vpc_id: Option<String>,
    }
}

list_query! {
    /// Paging and `?vpcId=&subnetId=`: the agents list (another value matches no agent).
    AgentListQuery {
        /// Only the agents in this VPC.
        vpc_id: Option<String>,
        /// Only the agents in this subnet.
        subnet_id: Option<String>,
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
