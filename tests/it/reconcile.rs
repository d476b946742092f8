//! The reconciler's invariants, against real etcd.

use std::time::Duration;

use etcd_client::{Permission, PermissionType};

use crate::support::{CoordProcess, etcd, eventually};

/// Invariant 1: nothing is reconciled before the cache's first full read.
///
/// The agent's etcd user may write its presence key but not read it, so
/// the lease is granted and a write would succeed, but the cache can never
/// complete its first read. The agent must not write. Once reading is
/// allowed, it must catch up by itself.
#[tokio::test]
async fn nothing_is_written_before_the_cache_has_completed_its_first_read() {
    let etcd = etcd().await;
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    admin.user_add("root", "rootpw", None).await.expect("root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("root role");
    admin.role_add("agent").await.expect("role");
    admin
        .role_grant_permission(
            "agent",
            Permission::new(PermissionType::Write, "/coord/agents/").with_prefix(),
        )
        .await
        .expect("write permission");
    admin
        .user_add("agent", "agentpw", None)
        .await
        .expect("user");
    admin
        .user_grant_role("agent", "agent")
        .await
        .expect("grant");
    admin.auth_enable().await.expect("auth on");
    let mut root = etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("root", "rootpw")),
    )
    .await
    .expect("root connects");

    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("pw"), "agentpw\n").expect("password file");
    let text = format!(
        "[agent]\nname = \"web-01\"\nttl = \"10s\"\n[etcd]\nendpoints = [\"{}\"]\nusername = \"agent\"\npassword_file = \"{}\"\n",
        etcd.endpoint(),
        dir.path().join("pw").display()
    );
    let agent = CoordProcess::run(&text);
    eventually("the agent's session lease", || {
        let mut root = root.clone();
        async move {
            let leases = root.leases().await.ok()?;
            (!leases.leases().is_empty()).then_some(())
        }
    })
    .await;
    // The agent has a lease and write access; give it time to (wrongly) write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kvs = root
        .get("/coord/agents/web-01", None)
        .await
        .expect("root reads");
    assert!(
        kvs.kvs().is_empty(),
        "presence was written before the cache was ready"
    );
    assert!(
        !agent.log().contains("agentpw"),
        "the password leaked into the log"
    );

    root.role_grant_permission(
        "agent",
        Permission::new(PermissionType::Readwrite, "/coord/agents/").with_prefix(),
    )
    .await
    .expect("read permission");
    eventually("presence once the cache can read", || {
        let mut root = root.clone();
        async move {
            let r = root.get("/coord/agents/web-01", None).await.ok()?;
            (!r.kvs().is_empty()).then_some(())
        }
    })
    .await;
}
