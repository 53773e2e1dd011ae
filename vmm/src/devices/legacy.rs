//! Legacy PC devices a Linux guest expects: a 16550 serial console (vm-superio) and the
//! i8042 controller's reset line, which is how the guest asks to stop.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The COM1 console writing to a log file or standard output.
pub struct SerialConsole(pub Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>);

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // An error here is the log file failing; the guest cannot cause it and must
            // not be stopped by it.
            let _ = self.0.write(offset as u8, data[0]);
        }
    }
}

/// The i8042 keyboard controller, reduced to what guests use: status reads and the CPU
/// reset command (0xFE written to port 0x64).
pub struct I8042 {
    /// Written when the guest resets.
    pub reset: EventFd,
}

/// Offset of the command/status port (0x64) from the device base (0x60).
const I8042_COMMAND: u64 = 4;
/// The "pulse reset line" command.
const I8042_RESET: u8 = 0xfe;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Output buffer empty, input buffer empty: nothing to read, ready for commands.
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
            let _ = self.reset.write(1);
        }
    }
}
