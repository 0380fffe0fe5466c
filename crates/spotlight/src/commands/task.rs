//! `spotlight task get|set|watch` against a running coordinator.

use anyhow::Context;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::control_client::ControlClient;

use spotlight_service::Side;

use super::load_security;
use crate::cli::{TaskAction, TaskArgs, parse_gains, split_list};
use crate::settings::Settings;

fn print(task: &pb::Task) {
    let gains: std::collections::BTreeMap<_, _> = task.gains.iter().collect();
    println!(
        "{}",
        serde_json::json!({"version": task.version, "categories": task.categories, "gains": gains})
    );
}

pub async fn run(settings: Settings, args: TaskArgs) -> anyhow::Result<()> {
    let security = load_security(&settings, Side::Client)?;
    let channel = security
        .endpoint(&args.coordinator)
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", args.coordinator))?;
    let mut client = ControlClient::with_interceptor(channel, security.interceptor());
    match args.action {
        TaskAction::Get => print(
            &client
                .get_task(pb::GetTaskRequest {})
                .await
                .map_err(status)?
                .into_inner(),
        ),
        TaskAction::Set { categories, gains } => {
            let gains = parse_gains(&gains).map_err(anyhow::Error::msg)?;
            let request = pb::SetTaskRequest {
                categories: split_list(&categories),
                gains: gains.into_iter().collect(),
            };
            print(&client.set_task(request).await.map_err(status)?.into_inner());
        }
        TaskAction::Watch => {
            let mut stream = client
                .watch_task(pb::WatchTaskRequest {})
                .await
                .map_err(status)?
                .into_inner();
            while let Some(task) = stream.message().await.map_err(status)? {
                print(&task);
            }
        }
    }
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}
