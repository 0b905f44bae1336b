use clap::Parser;
use walsync::shell::cli::Cli;

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "walsync {}: the pipeline commands are not built yet; see README.md",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
