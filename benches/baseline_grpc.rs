//! Baseline for the gRPC check benchmark: Envoy's `RateLimitService` answering every call `OK`
//! without looking at it, served like Tally serves it (tonic routes inside an axum router, h2c).
//! `benches/enforcer_http.sh` runs it beside Tally on the same machine.
//!
//! Usage: `baseline_grpc 127.0.0.1:PORT`

use tally_enforcer::grpc::rls::rate_limit_response::{Code, DescriptorStatus};
use tally_enforcer::grpc::rls::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use tally_enforcer::grpc::rls::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

struct Empty;

#[tonic::async_trait]
impl RateLimitService for Empty {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let statuses = request
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses,
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".into());
    let app = tonic::service::Routes::new(RateLimitServiceServer::new(Empty)).into_axum_router();
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
