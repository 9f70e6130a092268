//! How the server is deployed: several replicas on one PostgreSQL database, TLS, and health
//! that follows the database.
use gantry_proto as pb;
use gantry_tests::*;
use pb::{JobStatus, job_service_client::JobServiceClient, session_response::Kind as Out};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A runner's session is held by replica A; jobs are submitted and canceled through replica B.
/// LISTEN/NOTIFY carries both to A at once (the sessions' safety-net re-check is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_push_work_and_cancels_to_a_session_on_another_replica() {
    let Some(db) = Db::postgres() else { return };
    let server = TestServer::start_with(db, |c| c.session_recheck_ms = 3_600_000).await;
    let replica = server.replica().await;
    let mut via_b = JobServiceClient::with_interceptor(
        channel(&format!("http://{}", replica.addr)).await,
        Bearer::new(&server.api_token),
    );
    let mut runner = server.runner("on-a", &[], 1).await;
    let mut session = runner.session(1, vec![]).await;

    let id = submit(&mut via_b, sh("sleep 600")).await;
    let a = session.next_assignment().await;
    assert_eq!(a.job_id, id);
    via_b
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "from b".into(),
        })
        .await
        .expect("cancel via replica b");
    loop {
        if let Out::Command(pb::Command {
            kind: Some(pb::command::Kind::Cancel(c)),
            ..
        }) = session.next().await
        {
            assert_eq!(c.job_id, id);
            assert_eq!(c.reason, "from b");
            break;
        }
    }
    replica.shutdown().await.expect("replica stops");
    server.stop().await;
}

/// Two runners claim concurrently through two replicas: every job is handed out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_on_two_replicas_never_double_assign() {
    let Some(db) = Db::postgres() else { return };
    let server = TestServer::start(db).await;
    let replica = server.replica().await;
    let mut jobs = server.jobs().await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(submit(&mut jobs, sh("true")).await);
    }
    let r1 = server.runner("one", &[], 64).await;
    let r2 = server.runner("two", &[], 64).await;
    let on_b = pb::runner_service_client::RunnerServiceClient::with_interceptor(
        channel(&format!("http://{}", replica.addr)).await,
        Bearer::new(&r2.credential),
    );
    let drain = |mut c: pb::runner_service_client::RunnerServiceClient<Authed>| async move {
        let mut got = Vec::new();
        loop {
            let a = c
                .claim(pb::ClaimRequest {
                    max_jobs: 3,
                    wait_seconds: 0,
                })
                .await
                .expect("claim")
                .into_inner()
                .assignments;
            if a.is_empty() {
                return got;
            }
            got.extend(a.into_iter().map(|a| a.job_id));
        }
    };
    let (a, b) = tokio::join!(drain(r1.client.clone()), drain(on_b));
    let mut all: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        all, expected,
        "each job claimed exactly once across replicas"
    );
    replica.shutdown().await.expect("replica stops");
    server.stop().await;
}

/// With a certificate and key the server speaks TLS only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    let tls_files = TlsFiles::self_signed("localhost");
    let cert_pem = &tls_files.cert_pem;
    let server = TestServer::start_with(Db::Sqlite, |c| tls_files.serve(c)).await;
    let tls = Channel::from_shared(format!("https://{}", server.addr))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert_pem))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("TLS connection");
    let mut jobs = JobServiceClient::with_interceptor(tls.clone(), Bearer::new(&server.api_token));
    let id = submit(&mut jobs, sh("echo tls")).await;
    assert_eq!(get(&mut jobs, &id).await.status, JobStatus::Queued as i32);
    let health = HealthClient::new(tls)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over TLS");
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(server.url())
        .expect("url")
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = JobServiceClient::with_interceptor(ch, Bearer::new(&server.api_token))
            .list_jobs(pb::ListJobsRequest::default())
            .await;
        assert!(r.is_err(), "plaintext call must fail against a TLS server");
    }
    server.stop().await;
}

/// Beside a TLS listener, `health_listen` serves `grpc.health.v1` in plaintext (for
/// Kubernetes' gRPC probes, which cannot speak TLS) and nothing else; the `liveness` service
/// is SERVING as the overall one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_health_listener_serves_only_health_beside_tls() {
    let tls_files = TlsFiles::self_signed("localhost");
    let server = TestServer::start_with(Db::Sqlite, |c| {
        tls_files.serve(c);
        c.health_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let at = server
        .health_addr()
        .expect("a health listener was asked for");
    assert_ne!(at.port(), server.addr.port());
    let plain = Channel::from_shared(format!("http://{at}"))
        .expect("url")
        .connect()
        .await
        .expect("plaintext connection to the health listener");
    for service in ["", "liveness", "gantry.v1.JobService"] {
        let answer = HealthClient::new(plain.clone())
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"));
        assert_eq!(
            answer.into_inner().status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let other = JobServiceClient::with_interceptor(plain, Bearer::new(&server.api_token))
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("the health listener serves nothing but health");
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");
    server.stop().await;
}

/// Health is SERVING while the database answers and NOT_SERVING once it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    let Some(db) = Db::postgres() else { return };
    let Db::Postgres(admin) = db.clone() else {
        unreachable!()
    };
    let server = TestServer::start(db).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "gantry.v1.JobService".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch.next().await.expect("status").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // Take the database away (a real fault: the database is dropped under the server).
    let name = server
        .database_url()
        .rsplit('/')
        .next()
        .expect("db name")
        .to_string();
    let conn = sea_orm::Database::connect(admin.as_str())
        .await
        .expect("admin connection");
    sea_orm::ConnectionTrait::execute_unprepared(
        &conn,
        &format!("DROP DATABASE {name} WITH (FORCE)"),
    )
    .await
    .expect("drop database");
    let _ = conn.close().await;
    let next = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a status change")
        .expect("status")
        .expect("status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let bare = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check");
    assert_eq!(bare.into_inner().status, ServingStatus::NotServing as i32);
    // Liveness does not follow the database: a restart would not bring it back.
    let live = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: gantry_server::LIVENESS.into(),
        })
        .await
        .expect("liveness check");
    assert_eq!(live.into_inner().status, ServingStatus::Serving as i32);
    drop(watch);
    server.stop().await;
}
