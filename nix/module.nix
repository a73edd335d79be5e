# NixOS module: `services.pie` runs `pie serve` as a system service, the way systemd/pie.service
# does (a system user, /var/lib/pie as home and PIE_HOME's parent, the sandbox, the NVIDIA devices,
# a stop timeout over pie's graceful shutdown), with config.toml rendered from `settings`.
#
#   services.pie = {
#     enable = true;
#     flavor = "cuda12.8";
#     settings.model = [ { hf_repo = "Qwen/Qwen3-0.6B"; device = [ "cuda:0" ]; } ];
#   };
#
# The flake's nixosModules.default imports this file and defaults `package` to the flavor's package.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.pie;
  toml = pkgs.formats.toml { };
  flavors = builtins.attrValues (import ./flavors.nix { flavorsDir = ../flavors; });
  flavor = lib.findFirst (f: f.name == cfg.flavor) (throw "pie: unknown flavor ${cfg.flavor}") flavors;
  stateDir = "/var/lib/pie";
  pieHome = "${stateDir}/.pie";
  configFile = toml.generate "pie-config.toml" cfg.settings;
  # pie's graceful phase: shutdown_timeout_s (flat, or under [server]; 30 s by default).
  shutdownTimeout = cfg.settings.shutdown_timeout_s or (cfg.settings.server.shutdown_timeout_s or 30);
in
{
  options.services.pie = {
    enable = lib.mkEnableOption "pie, the programmable LLM server";

    flavor = lib.mkOption {
      type = lib.types.enum (map (f: f.name) flavors);
      default = "portable";
      description = "Which build of torch (and FlashInfer) to run: one of pie's flavors/*.toml.";
    };

    package = lib.mkOption {
      type = lib.types.package;
      description = "The pie package; the flake's module defaults it to the package of `flavor`.";
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "pie";
      description = "User that runs pie (created when left as `pie`).";
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "pie";
      description = "Group of that user (created when left as `pie`).";
    };

    settings = lib.mkOption {
      type = lib.types.submodule { freeformType = toml.type; };
      default = { };
      description = ''
        pie's config.toml as Nix data (keys as in pie's docs/configuration.md). It is rendered to
        the Nix store and linked as /var/lib/pie/.pie/config.toml. Defaults: host 127.0.0.1, port
        8080, and the built-in `pie/tiny-random` model on the flavor's device.
      '';
      example = lib.literalExpression ''
        {
          host = "0.0.0.0";
          enable_auth = true;
          model = [ { hf_repo = "Qwen/Qwen3-0.6B"; device = [ "cuda:0" ]; } ];
        }
      '';
    };

    gpu = lib.mkOption {
      type = lib.types.bool;
      default = flavor.cuda != "";
      defaultText = lib.literalMD "`true` for CUDA flavors";
      description = "Let the service open the NVIDIA device nodes (and join the video and render groups).";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open `settings.port` in the firewall.";
    };

    environment = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      example = {
        HF_HUB_OFFLINE = "1";
      };
      description = "Extra environment variables for the service.";
    };
  };

  config = lib.mkIf cfg.enable {
    services.pie.settings = {
      host = lib.mkDefault "127.0.0.1";
      port = lib.mkDefault 8080;
      model = lib.mkDefault [
        {
          hf_repo = "pie/tiny-random";
          device = [ flavor.device ];
        }
      ];
    };

    users.users = lib.mkIf (cfg.user == "pie") {
      pie = {
        isSystemUser = true;
        group = cfg.group;
        home = stateDir;
        extraGroups = lib.optionals cfg.gpu [ "video" "render" ];
      };
    };
    users.groups = lib.mkIf (cfg.group == "pie") { pie = { }; };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.settings.port ];

    systemd.services.pie = {
      description = "pie programmable LLM server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = {
        HOME = stateDir;
        PIE_HOME = pieHome;
        PYTHONUNBUFFERED = "1";
      } // cfg.environment;
      # PIE_HOME/config.toml is the rendered settings, so `pie config show` and `pie auth` (run as
      # the service user) see what the service runs with.
      preStart = ''
        mkdir -p ${pieHome}
        ln -sfn ${configFile} ${pieHome}/config.toml
      '';
      # Restart on failure, but give up after 3 failed starts in 2 minutes (bad config, port taken).
      startLimitIntervalSec = 120;
      startLimitBurst = 3;
      serviceConfig = {
        Type = "exec";
        User = cfg.user;
        Group = cfg.group;
        StateDirectory = "pie";
        StateDirectoryMode = "0750";
        WorkingDirectory = stateDir;
        ExecStart = "${lib.getExe cfg.package} serve --config ${pieHome}/config.toml";
        Restart = "on-failure";
        RestartSec = "5s";
        SuccessExitStatus = 130; # a second signal cut the graceful stop short
        KillSignal = "SIGTERM";
        KillMode = "mixed";
        TimeoutStopSec = "${toString (builtins.ceil (shutdownTimeout + 15))}s";

        DevicePolicy = "closed";
        DeviceAllow = lib.optionals cfg.gpu [
          "char-nvidiactl rw"
          "char-nvidia-frontend rw"
          "char-nvidia-uvm rw"
          "char-nvidia-caps rw"
        ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RemoveIPC = true;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
        SystemCallArchitectures = "native";
        UMask = "0027";
        # Not set, as in systemd/pie.service: MemoryDenyWriteExecute (CUDA and Triton JIT-compile
        # kernels) and ProcSubset=pid (torch reads /proc/meminfo and /proc/cpuinfo).
      };
    };
  };
}
