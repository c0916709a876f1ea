"""Reading scanner DICOM: series selection, vendor phase scaling, volume building."""
