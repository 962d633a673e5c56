//! `sluice-mock-provider`: an OpenAI-compatible mock LLM provider for the
//! sluice end-to-end tests and the demo. See README.md.

mod anthropic;
mod codec;
mod embeddings;
mod http;
mod provider;
mod responses;
mod server;
mod settings;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use settings::{parse_args, ArgsError, USAGE};

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args().skip(1)) {
        Ok(cli) => cli,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Invalid(message)) => {
            eprintln!("sluice-mock-provider: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind((cli.host, cli.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice-mock-provider: cannot listen on {}:{}: {e}", cli.host, cli.port);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-mock-provider: cannot read local address: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The harness waits for exactly this line.
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "LISTENING {addr}").and_then(|()| stdout.flush()).is_err() {
        eprintln!("sluice-mock-provider: cannot write to stdout");
    }
    eprintln!("sluice-mock-provider: provider {:?} serving on http://{addr}", cli.settings.name);

    let state = Arc::new(server::State::new(cli.settings));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let state = Arc::clone(&state);
                let spawned =
                    thread::Builder::new().name("conn".into()).spawn(move || server::serve_connection(&state, stream));
                if let Err(e) = spawned {
                    eprintln!("sluice-mock-provider: cannot spawn connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("sluice-mock-provider: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}
