//! Register a service with a health check, discover it, follow its
//! changes, and call it through a gRPC channel that follows discovery.
//!
//! etcd itself serves gRPC's health service, so the etcd member stands in
//! for the instance of a gRPC service here.
//!
//! ```console
//! $ COORD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example service
//! ```

use std::time::Duration;

use coord::coordinator::Service;
use coord::registry::ServiceChange;
use coord::registry::check::Check;
use coord::{Coord, Options};
use futures_util::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = Options::from_env();
    let endpoint = options.connect.endpoints[0].clone();
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned();
    let coord = Coord::connect(options).await?;
    let registry = coord.registry();

    // One call: the health record and the listing, on the session lease,
    // with a TCP check the library runs every second.
    let service = Service::new("greeter", "greeter-1", &addr)
        .metadata("version", "1.4.2")
        .check(Check::tcp(&addr).interval(Duration::from_secs(1)));
    let registration = registry.register(service).await?;
    println!(
        "registered greeter/greeter-1 at {addr} on lease {}",
        registration.lease().expect("written")
    );

    let found = registry.discover("greeter").await?;
    for instance in &found {
        println!(
            "discovered {} at {}",
            instance.id,
            instance.addr().unwrap_or("?")
        );
    }

    // Follow the service: maintenance withdraws the instance, ending it
    // lists it again.
    let mut updates = Box::pin(registry.watch("greeter"));
    let first = updates.next().await.expect("a first update");
    println!("watching greeter: {} instance(s)", first.current.len());
    registration.set_maintenance(Some("deploying"));
    wait_for(&mut updates, |c| matches!(c, ServiceChange::Removed(_))).await;
    println!("greeter-1 withdrawn for maintenance");
    registration.set_maintenance(None);
    wait_for(&mut updates, |c| matches!(c, ServiceChange::Added(_))).await;
    println!("greeter-1 listed again");

    // A gRPC channel balanced over the listed instances.
    let (channel, follow) = registry.grpc_channel("greeter");
    let mut health = HealthClient::new(channel);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            match health.check(request).await {
                Ok(answer) => return answer.into_inner(),
                // The channel learns the instance from the cache first.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    println!(
        "gRPC health check through the channel: status {}",
        answer.status
    );

    follow.abort();
    registration.release().await?;
    println!("deregistered greeter-1");
    coord.close().await;
    Ok(())
}

async fn wait_for(
    updates: &mut (impl futures_util::Stream<Item = coord::registry::ServiceUpdate> + Unpin),
    wanted: impl Fn(&ServiceChange) -> bool,
) {
    while let Some(update) = updates.next().await {
        if update.changes.iter().any(&wanted) {
            return;
        }
    }
}
