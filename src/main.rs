//! The `ec2jobd` binary; everything lives in the `ec2jobd-server` crate.

fn main() -> std::process::ExitCode {
    ec2jobd_server::cli::main()
}
