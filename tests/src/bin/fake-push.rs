//! Runs the fake APNs + FCM servers for the end-to-end suites. Prints one JSON line with the
//! endpoints and credential files, then serves until killed.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where to write `ca.pem`, `apns-key.p8` and `service-account.json`.
    #[arg(long)]
    dir: std::path::PathBuf,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.
    #[arg(long, default_value_t = 1000)]
    max_streams: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fake = relay_tests::fake_push::start(&args.dir, args.max_streams, true).await?;
    println!(
        "{}",
        serde_json::json!({
            "apns_url": fake.apns_url,
            "fcm_url": fake.fcm_url,
            "control": format!("http://{}", fake.control),
            "dir": fake.dir,
            "team_id": relay_tests::fake_push::TEAM_ID,
            "key_id": relay_tests::fake_push::KEY_ID,
        })
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
