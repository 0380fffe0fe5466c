//! gRPC services: thin conversions between proto and the domain types.

pub mod control;
pub mod inference;
pub mod registry;

use spotlight_proto::v1 as pb;

use crate::task::ActiveTask;

pub(crate) fn task_to_proto(t: &ActiveTask) -> pb::Task {
    pb::Task {
        version: t.version,
        categories: t.spec.categories.clone(),
        gains: t.spec.gains.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}
