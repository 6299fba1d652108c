//! `--config FILE`: a TOML file that sets any flag, by its name (`max-connections = 5000`, or
//! `max_connections`); flags given on the command line win. A list sets a repeatable flag (`listen =
//! ["0.0.0.0:1883", "[::]:1883"]`), `true` a switch. Unknown keys are errors, as are values of the
//! wrong kind; `shardmq check-config FILE` validates a file and prints the settings it makes.
//!
//! How: the file becomes command-line arguments placed before the real ones, for the flags the command
//! line does not give, and the whole is parsed as usual. So every flag, present and future, can be set
//! from the file with exactly the command line's rules and messages, and nothing is parsed twice.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The broker's flags, as its `--help` lists them (long names without the dashes), and whether each is
/// a switch (takes no value).
pub fn known_flags<T: argh::FromArgs>() -> Vec<(String, bool)> {
    let help = match T::from_args(&["shardmq"], &["--help"]) {
        Err(e) => e.output,
        Ok(_) => String::new(),
    };
    let mut out = Vec::new();
    for line in help.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("--") else { continue };
        let Some(name) = rest.split_whitespace().next() else { continue };
        if name == "help" {
            continue;
        }
        // The help text does not say which flags take a value: a flag alone parses for a switch, and
        // is refused for an option for want of one.
        let flag = format!("--{name}");
        let switch = match T::from_args(&["shardmq"], &[flag.as_str()]) {
            Ok(_) => true,
            Err(e) => !e.output.contains("No value provided"),
        };
        out.push((name.to_string(), switch));
    }
    out
}

/// Whether `argv` (after the program name) gives `flag` itself.
fn given(argv: &[String], flag: &str) -> bool {
    let long = format!("--{flag}");
    argv.iter().any(|a| *a == long || a.starts_with(&format!("{long}=")))
}

/// The path of `--config PATH` (or `--config=PATH`) in `argv`, and `argv` without it.
fn take_config(argv: &[String]) -> Result<(Option<String>, Vec<String>)> {
    let mut path = None;
    let mut rest = Vec::with_capacity(argv.len());
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            path = Some(it.next().context("--config needs a file")?.clone());
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        } else {
            rest.push(a.clone());
        }
    }
    Ok((path, rest))
}

/// The arguments a config file stands for, for the flags `argv` does not give.
pub fn file_args(path: &Path, flags: &[(String, bool)], argv: &[String]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let Some((_, switch)) = flags.iter().find(|(f, _)| *f == name && f != "config") else {
            bail!("{}: unknown setting {key:?} (settings are the flags of `shardmq --help`)", path.display());
        };
        if given(argv, &name) {
            continue;
        }
        let flag = format!("--{name}");
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => bail!("{}: {key} must be a string or a number", path.display()),
            }
        };
        match (value, switch) {
            (toml::Value::Boolean(on), true) => {
                if *on {
                    out.push(flag);
                }
            }
            (_, true) => bail!("{}: {key} is a switch: true or false", path.display()),
            (toml::Value::Array(items), false) => {
                for v in items {
                    out.push(flag.clone());
                    out.push(scalar(v)?);
                }
            }
            (v, false) => {
                out.push(flag);
                out.push(scalar(v)?);
            }
        }
    }
    Ok(out)
}

/// The command line with the settings of its `--config` file (if any) put in front, and the file.
/// Subcommands other than the server's run are left alone.
pub fn expand<T: argh::FromArgs>(argv: Vec<String>) -> Result<(Vec<String>, Option<String>)> {
    let Some((prog, args)) = argv.split_first() else { return Ok((argv, None)) };
    let (path, rest) = take_config(args)?;
    let Some(path) = path else { return Ok((argv, None)) };
    let flags = known_flags::<T>();
    let mut out = vec![prog.clone()];
    out.extend(file_args(Path::new(&path), &flags, &rest)?);
    out.extend(rest);
    Ok((out, Some(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small stand-in for the broker's flags.
    #[derive(argh::FromArgs, Debug, PartialEq)]
    /// test
    struct Flags {
        /// listen
        #[argh(option)]
        listen: Vec<String>,
        /// max connections
        #[argh(option, default = "10")]
        max_connections: usize,
        /// in memory
        #[argh(switch)]
        in_memory: bool,
        /// config
        #[argh(option)]
        config: Option<String>,
    }

    fn parse(file: &str, cli: &[&str]) -> Result<Flags> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv = vec!["shardmq".to_string(), "--config".into(), path.display().to_string()];
        argv.extend(cli.iter().map(|s| s.to_string()));
        let (args, _) = expand::<Flags>(argv)?;
        let strs: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        <Flags as argh::FromArgs>::from_args(&["shardmq"], &strs).map_err(|e| anyhow::anyhow!(e.output))
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let f = parse("max_connections = 5\nin-memory = true\nlisten = [\"a:1\", \"b:2\"]\n", &[]).unwrap();
        assert_eq!((f.max_connections, f.in_memory, f.listen), (5, true, vec!["a:1".into(), "b:2".into()]));
        let f = parse(
            "max-connections = 5\nlisten = [\"a:1\"]\n",
            &["--max-connections", "7", "--listen", "c:3"],
        )
        .unwrap();
        assert_eq!((f.max_connections, f.listen), (7, vec!["c:3".to_string()]));
        assert!(!parse("in-memory = false\n", &[]).unwrap().in_memory);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let err = |file: &str| parse(file, &[]).unwrap_err().to_string();
        assert!(err("max-conections = 5\n").contains("unknown setting \"max-conections\""));
        assert!(err("in-memory = \"yes\"\n").contains("is a switch"));
        assert!(
            err("max-connections = \"many\"\n").contains("max-connections"),
            "{}",
            err("max-connections = \"many\"\n")
        );
        assert!(err("listen = [[1]]\n").contains("string or a number"));
        assert!(err("max-connections = \n").contains("c.toml"), "a TOML syntax error names the file");
        assert!(err("config = \"other.toml\"\n").contains("unknown setting"));
    }

    #[test]
    fn without_config_the_command_line_is_untouched() {
        let argv: Vec<String> = ["shardmq", "--in-memory"].iter().map(|s| s.to_string()).collect();
        assert_eq!(expand::<Flags>(argv.clone()).unwrap(), (argv, None));
        assert!(known_flags::<Flags>().contains(&("in-memory".to_string(), true)));
        assert!(known_flags::<Flags>().contains(&("listen".to_string(), false)));
    }
}
