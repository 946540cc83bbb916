import CSpillwayVerbs
import Logging
import Metrics

/// Which transport the remote tiers use, decided once per process from the hardware.
///
/// RDMA needs a verbs device: `ibv_get_device_list` (libibverbs) is asked at first use. With
/// no device, or with devices but no verbs transport in this build, the choice is TCP, and
/// the fallback is logged (with the reason) and counted
/// (`spillway_transport_fallbacks_total{reason}`), never silent.
public enum TransportSelection {
    /// RDMA device names libibverbs reports (empty when there is none or libibverbs finds no
    /// provider).
    public static func rdmaDevices() -> [String] {
        var count: Int32 = 0
        guard let list = ibv_get_device_list(&count) else { return [] }
        defer { ibv_free_device_list(list) }
        var names: [String] = []
        for index in 0..<Int(max(0, count)) {
            if let device = list[index], let name = ibv_get_device_name(device) { names.append(String(cString: name)) }
        }
        return names
    }

    /// The probe's outcome, computed once.
    public static let probe: (devices: [String], reason: String) = {
        let devices = rdmaDevices()
        return (devices, fallbackReason(devices: devices))
    }()

    /// Why TCP is used, given the devices found (the label of the fallback counter).
    public static func fallbackReason(devices: [String]) -> String {
        devices.isEmpty ? "no-rdma-device" : "verbs-transport-not-built"
    }

    /// Chooses the transport for `component` and logs and counts the fallback to TCP.
    /// Returns "tcp" (the only transport this build carries).
    @discardableResult
    public static func choose(for component: String, logger: Logger) -> String {
        let (devices, reason) = probe
        if devices.isEmpty {
            logger.notice("no RDMA device (libibverbs found none); using TCP", metadata: ["component": "\(component)", "fallback": "\(reason)"])
        } else {
            logger.warning("RDMA devices present but this build has no verbs transport; using TCP", metadata: [
                "component": "\(component)", "devices": "\(devices.joined(separator: ","))", "fallback": "\(reason)",
            ])
        }
        Counter(label: "spillway_transport_fallbacks_total", dimensions: [("component", component), ("reason", reason)]).increment()
        return "tcp"
    }
}
